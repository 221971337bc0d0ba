# The unit file NixOS writes for one of systemd.services, from its evaluated definition (the
# options stubs.nix declares), after nixos/lib/systemd-lib.nix (the unitConfig made of the
# dependency options, commonUnitText, serviceToUnit, attrsToSection, toOption) and the
# script/preStart handling of nixos/lib/systemd-unit-options.nix and systemd.nix:
#   - one line per value, a list as repeated lines, booleans as true/false, [] as no line;
#   - wants/after/... space-joined in [Unit]; Environment="NAME=value" lines, PATH from `path`
#     and the default path every NixOS service gets; WantedBy= in [Install].
# Left out: systemd.globalEnvironment (LOCALE_ARCHIVE and TZDIR on a real system), restart and
# reload triggers, aliases; the job scripts are stand-ins (pkgs.writeShellScript of stubs.nix).
{ lib, pkgs }:
name: svc:

let
  inherit (lib)
    concatLists
    concatMapStrings
    concatMapStringsSep
    concatStrings
    concatStringsSep
    filterAttrs
    isList
    mapAttrs
    mapAttrsToList
    optionalAttrs
    optionalString
    ;

  toOption =
    x:
    if x == true then
      "true"
    else if x == false then
      "false"
    else
      toString x;

  attrsToSection =
    as:
    concatStrings (
      concatLists (mapAttrsToList (k: v: map (x: "${k}=${toOption x}\n") (if isList v then v else [ v ])) as)
    );

  # stage2ServiceConfig appends these to every service's path (stand-ins for the packages).
  defaultPath = map (p: "${builtins.storeDir}/00000000000000000000000000000000-${p}") [
    "coreutils"
    "findutils"
    "gnugrep"
    "gnused"
    "systemd"
  ];
  path = svc.path ++ defaultPath;

  unitConfig =
    mapAttrs (_: toString) (
      filterAttrs (_: v: v != [ ]) {
        Requires = svc.requires;
        Wants = svc.wants;
        After = svc.after;
        Before = svc.before;
      }
    )
    // optionalAttrs (svc.description != "") { Description = svc.description; }
    // svc.unitConfig;

  jobScript = suffix: text: toString (pkgs.writeShellScript "unit-script-${name}-${suffix}" "set -e\n\n${text}");
  serviceConfig =
    optionalAttrs (svc.script != "") { ExecStart = jobScript "start" svc.script; }
    // optionalAttrs (svc.preStart != "") { ExecStartPre = [ (jobScript "pre-start" svc.preStart) ]; }
    // svc.serviceConfig;

  environment = {
    PATH = concatMapStringsSep ":" (p: "${p}/bin") path + ":" + concatMapStringsSep ":" (p: "${p}/sbin") path;
  } // svc.environment;
in
''
  [Unit]
  ${attrsToSection unitConfig}
''
+ "[Service]\n"
+ concatMapStrings (
  n: optionalString (environment.${n} != null) "Environment=${builtins.toJSON "${n}=${environment.${n}}"}\n"
) (builtins.attrNames environment)
+ attrsToSection serviceConfig
+ optionalString (svc.wantedBy != [ ]) ''

  [Install]
  WantedBy=${concatStringsSep " " svc.wantedBy}
''
