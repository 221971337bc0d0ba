# The narmesh node of a NixOS build host, its post-build hook, and the host's Nix substituting
# from it. Independent of the flake: the package is `pkgs.narmesh` (add the flake's overlay) or
# `services.narmesh.package`.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkOption types;

  cfg = config.services.narmesh;
  format = pkgs.formats.toml { };

  rawFile = format.generate "narmesh-unchecked.toml" cfg.finalSettings;
  # Checked by the node itself, so a bad value fails the system build rather than the service start.
  configFile = pkgs.runCommand "narmesh.toml" { } ''
    ${cfg.package}/bin/narmesh check-config ${rawFile} > /dev/null
    cp ${rawFile} $out
  '';

  # The hook finds the socket and the spool through its environment, which Nix does not set, and
  # else uses the node's defaults. Nix starts it once per build: with the defaults it is the
  # binary itself; other paths need a script to set them, a shell started before every call.
  # (The same defaults as DEFAULT_SOCKET and DEFAULT_SPOOL in proto/src/hook.rs; `narmesh
  # doctor` reads this script's exports.)
  hookDefaults =
    cfg.settings.socket == "/run/narmesh/narmesh.sock"
    && cfg.settings.spool-dir == "/var/lib/narmesh/spool";
  hook =
    if hookDefaults then
      "${cfg.package}/bin/narmesh-hook"
    else
      pkgs.writeShellScript "narmesh-post-build-hook" ''
        export NARMESH_SOCKET=${lib.escapeShellArg cfg.settings.socket}
        export NARMESH_SPOOL=${lib.escapeShellArg cfg.settings.spool-dir}
        exec ${cfg.package}/bin/narmesh-hook
      '';

  port = addr: lib.toInt (lib.last (lib.splitString ":" addr));
  meshEnabled = cfg.settings.mesh.enabled or true;
  meshListen = cfg.settings.mesh.listen or "0.0.0.0:5481";
  httpListen = cfg.settings.http.listen or [ "127.0.0.1:5480" ];
  # A wildcard listener is reached on loopback.
  cacheUrl = addr: "http://" + lib.replaceStrings [ "0.0.0.0:" "[::]:" ] [ "127.0.0.1:" "[::1]:" ] addr;

  credential = "/run/credentials/narmesh.service/secret-key";

  outsideStore = name: file: {
    assertion = file == null || (lib.hasPrefix "/" file && !lib.hasPrefix "${builtins.storeDir}/" file);
    message = ''
      services.narmesh.${name} = "${toString file}": give the absolute path of a file outside the
      Nix store (every local user can read the store), as a string, not a Nix path literal, which
      would copy the file into the store.'';
  };
in
{
  options.services.narmesh = {
    enable = lib.mkEnableOption "the narmesh node, which shares every build of this host with its mesh";

    package = lib.mkPackageOption pkgs "narmesh" {
      extraDescription = "Outside the flake, `pkgs.narmesh` comes from the flake's `overlays.default`.";
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = format.type;
        options = {
          data-dir = mkOption {
            type = types.str;
            default = "/var/lib/narmesh";
            description = ''
              The node's database, blobs and generated key. The service may write only below
              /var/lib/narmesh (its StateDirectory): anywhere else needs
              `systemd.services.narmesh.serviceConfig.ReadWritePaths`.
            '';
          };
          socket = mkOption {
            type = types.str;
            default = "/run/narmesh/narmesh.sock";
            description = "Unix socket of the hook and the CLI; keep it below /run/narmesh (RuntimeDirectory).";
          };
          spool-dir = mkOption {
            type = types.str;
            default = "/var/lib/narmesh/spool";
            description = "Where the hook spools reports while the node is down.";
          };
        };
      };
      default = { };
      example = lib.literalExpression ''
        {
          key-name = "buildhost-1";
          trusted-public-keys = [ "buildhost-2-1:..." ];
          mesh.peers = [ "<endpoint id>@10.0.0.2:5481" ];
          mirror.s3 = { bucket = "my-nix-cache"; region = "eu-west-1"; };
        }
      '';
      description = ''
        The node's configuration file, as TOML (keys: README.md, "Configuration"). Unknown keys and
        bad values fail the system build: the file is checked with `narmesh check-config`.
      '';
    };

    finalSettings = mkOption {
      type = types.attrs;
      internal = true;
      readOnly = true;
      description = "The settings as rendered into the configuration file, for tests.";
    };

    secretKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/nix/key.sec";
      description = ''
        The Nix signing key (`nix-store --generate-binary-cache-key` format) the node signs with.
        systemd hands it to the service (LoadCredential), so it can stay readable by root only; it
        is never copied into the store. When null, the node makes its own key once in `data-dir`.
      '';
    };

    publicKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "buildhost-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
      description = ''
        This node's own public key (`name:base64`, what `narmesh status` prints), trusted by this
        host's Nix when `substituter.enable` is set, for its own paths once garbage-collected.
      '';
    };

    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/narmesh/s3.env";
      description = ''
        Environment file (systemd EnvironmentFile) with the S3 mirror's credentials:
        `AWS_ACCESS_KEY_ID=...`, `AWS_SECRET_ACCESS_KEY=...`.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the mesh's UDP port (from `settings.mesh.listen`) in the firewall.";
    };

    socketGroup = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "nixbld-users";
      description = ''
        A group, besides the node's own user, allowed to use the socket and the spool
        (`socket-group`). Under nix-daemon, as on NixOS, the hook runs as root and needs none;
        only a single-user Nix, whose hook runs as the building user, needs that user in it.
      '';
    };

    hook.enable = lib.mkEnableOption "narmesh-hook as this host's Nix post-build-hook";

    substituter.enable = lib.mkEnableOption ''
      this host's Nix substituting from the node, trusting its `trusted-public-keys` and `publicKey`'';
  };

  config = lib.mkMerge [
    { services.narmesh.finalSettings = cfg.settings; }

    (lib.mkIf cfg.enable {
      services.narmesh.settings = {
        secret-key-file = lib.mkIf (cfg.secretKeyFile != null) credential;
        socket-group = lib.mkIf (cfg.socketGroup != null) cfg.socketGroup;
      };

      assertions = [
        (outsideStore "secretKeyFile" cfg.secretKeyFile)
        (outsideStore "environmentFile" cfg.environmentFile)
        {
          assertion = !cfg.substituter.enable || httpListen != [ ];
          message = "services.narmesh.substituter.enable needs an address in services.narmesh.settings.http.listen.";
        }
      ];

      users.users.narmesh = {
        isSystemUser = true;
        group = "narmesh";
        description = "narmesh node";
      };
      users.groups.narmesh = { };

      environment.systemPackages = [ cfg.package ];
      # Where `narmesh status`, `push`, `pin` and `doctor` look for the node's settings.
      environment.etc."narmesh.toml".source = configFile;

      networking.firewall.allowedUDPPorts = lib.mkIf (cfg.openFirewall && meshEnabled) [ (port meshListen) ];

      nix.settings = lib.mkMerge [
        (lib.mkIf cfg.hook.enable { post-build-hook = hook; })
        (lib.mkIf cfg.substituter.enable {
          extra-substituters = map cacheUrl (lib.take 1 httpListen);
          extra-trusted-public-keys =
            (cfg.settings.trusted-public-keys or [ ]) ++ lib.optional (cfg.publicKey != null) cfg.publicKey;
        })
      ];

      systemd.services.narmesh = {
        description = "narmesh: shares this host's Nix builds with its mesh";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [
          "network-online.target"
          "nix-daemon.service"
        ];
        environment.NARMESH_LOG = "info";
        serviceConfig = {
          Type = "notify";
          ExecStart = "${cfg.package}/bin/narmesh serve --config ${configFile}";
          Restart = "on-failure";
          # A node stops with a failure when a part it needs ended (it logs which): started
          # again after 5 s, for as long as it takes (5 s apart, never 5 starts in 10 s: the
          # start limit).
          RestartSec = "5s";
          # A node whose runtime has run nothing for 30 s, or whose database writes have ended
          # none for 30 s (hung work, which never ends), stops telling systemd it is alive:
          # killed (SIGABRT) a minute after it last told, started again 5 s later.
          WatchdogSec = "60s";

          DynamicUser = false;
          User = "narmesh";
          Group = "narmesh";
          # Only a member may hand the socket and the spool to that group.
          SupplementaryGroups = lib.optional (cfg.socketGroup != null) cfg.socketGroup;
          LoadCredential = lib.optional (cfg.secretKeyFile != null) "secret-key:${cfg.secretKeyFile}";
          EnvironmentFile = lib.optional (cfg.environmentFile != null) cfg.environmentFile;

          StateDirectory = "narmesh";
          # The group's hook must get through to the spool; the node's own files stay 0600 (UMask).
          StateDirectoryMode = if cfg.socketGroup == null then "0700" else "0711";
          RuntimeDirectory = "narmesh";
          RuntimeDirectoryMode = "0755";
          UMask = "0077";
          LimitNOFILE = 65536;

          # The store and its database (SQLite in WAL mode) are read, never written.
          ProtectSystem = "strict";
          ReadOnlyPaths = [
            "/nix/store"
            "/nix/var/nix/db"
          ];
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          PrivateMounts = true;
          # Other processes are hidden; /proc/sys stays (the default key name is the hostname).
          ProtectProc = "invisible";
          RemoveIPC = true;
          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          # AF_NETLINK: iroh watches the network interfaces.
          RestrictAddressFamilies = [
            "AF_UNIX"
            "AF_INET"
            "AF_INET6"
            "AF_NETLINK"
          ];
          RestrictNamespaces = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [
            "@system-service"
            "~@privileged"
          ];
        };
      };
    })
  ];
}
