# A typical build host: its own signing key (a root-only file), one peer, the S3 mirror, the hook,
# and the host's Nix substituting from the node. The keys and the endpoint id are real ones, so
# `narmesh check-config` accepts the rendered file.
{
  services.narmesh = {
    enable = true;
    secretKeyFile = "/etc/narmesh/key.sec";
    environmentFile = "/etc/narmesh/s3.env";
    openFirewall = true;
    hook.enable = true;
    substituter.enable = true;
    publicKey = "buildhost-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
    settings = {
      key-name = "buildhost-1";
      trusted-public-keys = [ "buildhost-2-1:L0Hn3m91rH+ELJbeITSCf4qr8zwL04sSf3GxQXiA6HE=" ];
      mesh.peers = [ "2f41e7de6f75ac7f842c96de2134827f8aabf33c0bd38b127f71b1417880e871@10.0.0.2:5481" ];
      mirror.s3 = {
        bucket = "my-nix-cache";
        region = "eu-west-1";
        concurrency = 8;
      };
    };
  };
}
