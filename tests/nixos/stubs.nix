# Just enough of NixOS and of nixpkgs' package set to evaluate nix/module.nix with the real module
# system and nixpkgs' lib alone. The options the module sets outside services.narmesh are declared
# here (a misspelt one fails the evaluation, as in NixOS); nothing is built.
{ lib, narmeshPackage, ... }:

let
  inherit (lib) mkOption types;

  loose = mkOption {
    type = types.attrsOf types.anything;
    default = { };
  };
  list = mkOption {
    type = types.listOf types.anything;
    default = [ ];
  };

  # pkgs.formats.toml's renderer, for nested attrsets of strings, numbers, bools and lists.
  toTOML =
    let
      key = k: if builtins.match "[A-Za-z0-9_-]+" k != null then k else builtins.toJSON k;
      value =
        v:
        if builtins.isString v || builtins.isPath v then
          builtins.toJSON (toString v)
        else if builtins.isBool v then
          lib.boolToString v
        else if builtins.isInt v || builtins.isFloat v then
          toString v
        else if builtins.isList v then
          "[" + lib.concatMapStringsSep ", " value v + "]"
        else if builtins.isAttrs v then
          "{ " + lib.concatStringsSep ", " (lib.mapAttrsToList (k: x: "${key k} = ${value x}") v) + " }"
        else
          throw "TOML has no ${builtins.typeOf v} (${builtins.toJSON v})";
      table =
        path: attrs:
        let
          sub = lib.filterAttrs (_: builtins.isAttrs) attrs;
          plain = lib.filterAttrs (_: v: !builtins.isAttrs v) attrs;
        in
        lib.optionalString (path != [ ]) "[${lib.concatMapStringsSep "." key path}]\n"
        + lib.concatStrings (lib.mapAttrsToList (k: v: "${key k} = ${value v}\n") plain)
        + lib.concatStrings (lib.mapAttrsToList (k: v: "\n" + table (path ++ [ k ]) v) sub);
    in
    table [ ];

  # A stand-in store path whose hash follows the content, as a real build's would.
  fakeStorePath =
    name: content:
    let
      hash = builtins.convertHash {
        hash = builtins.hashString "sha256" (builtins.unsafeDiscardStringContext content);
        hashAlgo = "sha256";
        toHashFormat = "nix32";
      };
    in
    "${builtins.storeDir}/${builtins.substring 0 32 hash}-${name}";

  tomlValue =
    types.nullOr (
      types.oneOf [
        types.bool
        types.int
        types.float
        types.str
        types.path
        (types.attrsOf tomlValue)
        (types.listOf tomlValue)
      ]
    )
    // {
      description = "TOML value";
    };

  pkgs = {
    # A derivation in all but name: types.package would look a bare path up in the store.
    narmesh = {
      type = "derivation";
      name = "narmesh";
      pname = "narmesh";
      outPath = narmeshPackage;
      outputs = [ "out" ];
      meta.mainProgram = "narmesh";
    };
    formats.toml =
      { }:
      {
        type = types.attrsOf tomlValue;
        generate = name: value: builtins.toFile name (builtins.unsafeDiscardStringContext (toTOML value));
      };
    runCommand = name: _env: script: fakeStorePath name script;
    writeShellScript =
      name: text: builtins.toFile name (builtins.unsafeDiscardStringContext "#!/bin/sh\n${text}");
  };

  service = types.submodule {
    options = {
      description = mkOption {
        type = types.str;
        default = "";
      };
      wantedBy = list;
      requiredBy = list;
      wants = list;
      requires = list;
      after = list;
      before = list;
      path = list;
      restartTriggers = list;
      script = mkOption {
        type = types.lines;
        default = "";
      };
      preStart = mkOption {
        type = types.lines;
        default = "";
      };
      environment = loose;
      serviceConfig = loose;
      unitConfig = loose;
    };
  };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf (
        types.submodule {
          options.assertion = mkOption { type = types.bool; };
          options.message = mkOption { type = types.str; };
        }
      );
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    systemd.services = mkOption {
      type = types.attrsOf service;
      default = { };
    };
    users.users = mkOption {
      type = types.attrsOf (types.attrsOf types.anything);
      default = { };
    };
    users.groups = mkOption {
      type = types.attrsOf (types.attrsOf types.anything);
      default = { };
    };
    networking.firewall.allowedUDPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };
    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };
    nix.settings = loose;
    environment.systemPackages = list;
    environment.etc = mkOption {
      type = types.attrsOf (types.submodule { freeformType = types.attrsOf types.anything; });
      default = { };
    };
  };

  config._module.args.pkgs = pkgs;
}
