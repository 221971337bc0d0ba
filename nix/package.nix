{
  lib,
  stdenv,
  rustPlatform,
  installShellFiles,
}:

rustPlatform.buildRustPackage {
  pname = "narmesh";
  inherit ((lib.importTOML ../Cargo.toml).workspace.package) version;

  src = lib.fileset.toSource {
    root = ../.;
    # Cargo.toml names the benches; tests/ is left out, so editing a test rebuilds nothing.
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../hook
      ../proto
      ../formats
      ../fuzz-checks
      ../benches
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;
  # The node and its hook (a package of its own, not built by default; linked dynamically here).
  cargoBuildFlags = [
    "-p"
    "narmesh"
    "-p"
    "narmesh-hook"
  ];

  nativeBuildInputs = [ installShellFiles ];

  # The test suite needs Nix, SeaweedFS and network namespaces, none of which the sandbox has.
  doCheck = false;

  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    installShellCompletion --cmd narmesh \
      --bash <($out/bin/narmesh completions bash) \
      --fish <($out/bin/narmesh completions fish) \
      --zsh <($out/bin/narmesh completions zsh)
    $out/bin/narmesh man > narmesh.1
    installManPage narmesh.1
  '';

  meta = {
    description = "Share every Nix build across a mesh of build hosts, without slowing the build";
    license = with lib.licenses; [
      mit
      asl20
    ];
    platforms = lib.platforms.linux;
    mainProgram = "narmesh";
  };
}
