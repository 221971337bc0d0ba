# Evaluates nix/module.nix with nixpkgs' module system, without nixpkgs' package set (stubs.nix),
# and returns what a test checks, as JSON-friendly data. tests/nixos/eval.sh runs it.
{
  lib,
  narmeshPackage ? "/nix/store/00000000000000000000000000000000-narmesh",
  config ? { },
}:

let
  eval = lib.evalModules {
    specialArgs = { inherit narmeshPackage; };
    modules = [
      ./stubs.nix
      ../../nix/module.nix
      config
    ];
  };
  inherit (eval.config) services systemd networking nix users;
  inherit (eval._module.args) pkgs;
  svc = systemd.services.narmesh or null;
in
{
  service =
    if svc == null then
      null
    else
      {
        inherit (svc)
          description
          wantedBy
          wants
          after
          path
          environment
          serviceConfig
          ;
      };
  # The unit file NixOS would write for it (render-unit.nix), for systemd-analyze verify.
  unitText = if svc == null then null else import ./render-unit.nix { inherit lib pkgs; } "narmesh" svc;
  inherit (services.narmesh) finalSettings;
  # The file the module hands to `narmesh check-config`, as the stub renders it.
  configToml = builtins.readFile ((pkgs.formats.toml { }).generate "narmesh.toml" services.narmesh.finalSettings);
  # The hook as nix.conf names it, and the script's text when it is a script (not the package's
  # binary, which is not built here).
  hook = if nix.settings ? post-build-hook then toString nix.settings.post-build-hook else null;
  hookScript =
    if !(nix.settings ? post-build-hook) || lib.hasPrefix "${narmeshPackage}/" (toString nix.settings.post-build-hook) then
      null
    else
      builtins.readFile nix.settings.post-build-hook;
  inherit (networking.firewall) allowedUDPPorts;
  nixSettings = nix.settings;
  users = {
    narmesh = users.users.narmesh or null;
    groups = lib.attrNames users.groups;
  };
  systemPackages = map toString eval.config.environment.systemPackages;
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) eval.config.assertions);
  inherit (eval.config) warnings;
}
