{
  description = "narmesh: share every Nix build across a mesh of build hosts, without slowing the build";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      forAllSystems =
        f:
        nixpkgs.lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (
          system: f nixpkgs.legacyPackages.${system}
        );
    in
    {
      packages = forAllSystems (pkgs: {
        narmesh = pkgs.callPackage ./nix/package.nix { };
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.narmesh;
      });

      overlays.default = final: _prev: {
        narmesh = final.callPackage ./nix/package.nix { };
      };

      # Takes the package from pkgs.narmesh: add overlays.default, or set services.narmesh.package.
      nixosModules.narmesh = import ./nix/module.nix;
      nixosModules.default = self.nixosModules.narmesh;
    };
}
