#!/usr/bin/env bash
# Follows the README's install guide ("Install on a Debian or Ubuntu host running Nix")
# literally and requires `narmesh doctor` to say "all checks passed" on both hosts, so that
# the guide cannot rot.
#
# The guide's commands are the README's fenced blocks tagged `host=build1`, `host=build2` or
# `host=both` (```sh host=build1). They run in README order, as root, each block as one
# `bash -e -o pipefail` script in /root/narmesh (a checkout: the repository's deploy/ and
# README.md), `both` on build1 and then on build2, on two test hosts:
#
#   - a network namespace each, build1 at 10.0.0.1 and build2 at 10.0.0.2, on one bridge with
#     a third namespace that runs the S3 server (SeaweedFS) at the guide's S3 endpoint;
#   - a filesystem view each (a mount namespace): /etc, /usr, /var and /nix are overlays on
#     this machine's (writes go to the test's directory, a tmpfs of 8 GiB, never to the real
#     ones), /root is a directory of its own, /run a tmpfs; hostname build1 or build2.
#
# What the hosts cannot do here is done by stand-ins, first on PATH, each saying so when it
# runs (tests/guide/shims/):
#   cargo      `cargo build --release` (and the hook's static `cargo rustc`) links the binaries
#              under test into target/release/
#              ($NARMESH_BIN_DIR; default target/debug/narmesh of this repository and the
#              hook's static build, target/release/narmesh-hook) instead of compiling;
#   apt-get    `update` is skipped (no network); `install` is skipped for packages this machine
#              has, others are installed for real into the host's view from .deb files fetched
#              here beforehand ($NARMESH_GUIDE_DEBS, default /var/cache/narmesh-guide/debs);
#   systemctl  there is no systemd: start/stop/restart run a unit's ExecStart as its User with
#              its Environment(File), UMask and State/RuntimeDirectory; sandboxing is ignored;
#              a start waits until the process listens on a socket (as a person typing would);
#   scp        copies between the two hosts' filesystems.
# The S3 server is the test's: its bucket and access key are the ones the guide names (a bucket
# "you created"). A doctor block whose only failing lines are `peer` lines is run again, for at
# most 60 s (the guide says to run it again while the nodes catch up). Beyond the guide's words,
# the test checks that build2 substituted the guide's example path from its node and that
# build1's node mirrored it into the bucket.
#
# Needs root, iproute2, util-linux (unshare, nsenter, setpriv), SeaweedFS ($NARMESH_WEED,
# default /opt/narmesh-s3/bin/weed) and curl. Everything it starts is killed and every namespace
# deleted on exit; NARMESH_GUIDE_KEEP=1 keeps the working directory (logs, hosts' files).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
readme=$repo/README.md
# The binaries under test: both from $NARMESH_BIN_DIR, else narmesh from target/debug and the
# hook's static build ($NARMESH_HOOK_BIN, else target/release/narmesh-hook).
bin_dir=${NARMESH_BIN_DIR:-$repo/target/debug}
hook_bin=${NARMESH_BIN_DIR:+$NARMESH_BIN_DIR/narmesh-hook}
hook_bin=${hook_bin:-${NARMESH_HOOK_BIN:-$repo/target/release/narmesh-hook}}
weed=${NARMESH_WEED:-/opt/narmesh-s3/bin/weed}
debs=${NARMESH_GUIDE_DEBS:-/var/cache/narmesh-guide/debs}
hosts=(build1 build2)
declare -A ip=([build1]=10.0.0.1 [build2]=10.0.0.2)

started=$SECONDS
step() { printf '\n==> [%3ss] %s\n' "$((SECONDS - started))" "$*"; }
die() {
    printf '\nFAIL: %s\n' "$*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || die "run me as root (network and mount namespaces)"
for tool in ip unshare nsenter setpriv ss curl awk apt-get dpkg-query; do
    command -v "$tool" > /dev/null || die "$tool is missing"
done
[ -x "$weed" ] || die "SeaweedFS is not at $weed (set NARMESH_WEED; scripts/test.sh installs it)"
[ -x "$bin_dir/narmesh" ] || die "$bin_dir/narmesh is missing (set NARMESH_BIN_DIR)"
[ -x "$hook_bin" ] || die "$hook_bin is missing (build it as README step 2 does; or set NARMESH_HOOK_BIN)"
narmesh_bin=$(realpath "$bin_dir/narmesh")
hook_bin=$(realpath "$hook_bin")

work=$(mktemp -d /tmp/narmesh-guide.XXXXXX)
chmod 0755 "$work"
tag=ngd$$
ns_lan=$tag-lan
ns_s3=$tag-s3
weed_pid=

# Processes whose namespace `kind` (mnt, net) is that of process `pid`.
members() {
    local kind=$1 target p
    target=$(readlink "/proc/$2/ns/$kind" 2>/dev/null) || return 0
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/ns/$kind" 2>/dev/null)" = "$target" ] && echo "${p#/proc/}"
    done
    return 0
}

# Whether process $1 is in network namespace $2 (a name under /run/netns): never act on a
# reused process id.
in_netns() {
    local inode
    inode=$(stat -L -c %i "/run/netns/$2" 2>/dev/null) || return 1
    [ "$(readlink "/proc/$1/ns/net" 2>/dev/null)" = "net:[$inode]" ]
}

cleanup() {
    local rc=$? h a p
    set +e
    trap - EXIT INT TERM
    if [ $rc -ne 0 ]; then
        for f in "$work"/hosts/*/logs/*.log "$work"/s3/weed.log; do
            [ -f "$f" ] || continue
            printf '\n--- the end of %s\n' "${f#"$work"/}"
            tail -n 40 "$f"
        done
    fi
    step "cleaning up"
    for h in "${hosts[@]}"; do
        a=$(cat "$work/hosts/$h/anchor.pid" 2>/dev/null) || continue
        in_netns "$a" "$tag-$h" || continue
        # nix-daemon makes a mount namespace of its own: the host's network namespace finds it.
        for p in $(members mnt "$a") $(members net "$a"); do
            [ "$p" = "$a" ] || kill -KILL "$p" 2>/dev/null
        done
        kill -KILL "$a" 2>/dev/null
    done
    if [ -n "$weed_pid" ] && in_netns "$weed_pid" "$ns_s3"; then
        for p in $(members net "$weed_pid"); do
            [ "$p" = "$weed_pid" ] || kill -KILL "$p" 2>/dev/null
        done
        kill -KILL "$weed_pid" 2>/dev/null
    fi
    sleep 0.2
    for n in "$tag-build1" "$tag-build2" "$ns_s3" "$ns_lan"; do
        ip netns del "$n" 2> /dev/null
    done
    if [ -n "${NARMESH_GUIDE_KEEP:-}" ]; then
        echo "kept $work (a tmpfs: umount it when done)"
    else
        mountpoint -q "$work" && { umount "$work" || umount -l "$work"; }
        rm -rf "$work"
    fi
    if [ $rc -eq 0 ]; then
        printf '\nPASS: the README install guide ends with doctor passing on both hosts (%ss)\n' \
            "$((SECONDS - started))"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# The hosts' disks: everything the hosts and the S3 server write (the overlays' upper layers,
# the bucket) goes to a tmpfs of 8 GiB, so the nodes see a disk with room above their default
# free-space floor (5 GiB) and SeaweedFS one above its own, whatever this machine has free.
mount -t tmpfs -o size=8g,mode=0755 narmesh-guide "$work"
# The binaries under test, side by side, as the guide's `install` takes them.
bin_dir=$work/bin
mkdir "$bin_dir"
ln -s "$narmesh_bin" "$bin_dir/narmesh"
ln -s "$hook_bin" "$bin_dir/narmesh-hook"

# ---------------------------------------------------------------------------------------------
step "extracting the guide's blocks from $readme"
mkdir -p "$work/blocks"
awk -v dir="$work/blocks" '
    /^#+ / { heading = $0; sub(/^#+ /, "", heading) }
    /^\*\*[0-9]+\./ { heading = $0; gsub(/\*\*/, "", heading); sub(/\. .*/, "", heading); step_no = heading }
    /^```[a-z]+ host=(build1|build2|both)[ \t]*$/ {
        n++
        split($2, kv, "=")
        file = sprintf("%s/%02d.sh", dir, n)
        printf "%s\t%s\n", kv[2], (step_no == "" ? "-" : step_no) > sprintf("%s/%02d.meta", dir, n)
        inside = 1
        next
    }
    inside && /^```[ \t]*$/ { inside = 0; close(file); next }
    inside { print > file }
' "$readme"
blocks=("$work"/blocks/*.sh)
[ -e "${blocks[0]}" ] || die "the README has no blocks tagged host=build1/build2/both"
all_text=$(cat "${blocks[@]}")
grep -q 'narmesh doctor' <<< "$all_text" || die "the guide never runs narmesh doctor"
echo "${#blocks[@]} blocks"

# The S3 server the guide's mirror host is configured for: endpoint, bucket, access key.
s3_endpoint=$(sed -n 's/^endpoint = "\(http:\/\/[^"]*\)".*/\1/p' <<< "$all_text" | head -n1)
bucket=$(sed -n 's/^bucket = "\([^"]*\)".*/\1/p' <<< "$all_text" | head -n1)
access_key=$(sed -n 's/^AWS_ACCESS_KEY_ID=//p' <<< "$all_text" | head -n1)
secret_key=$(sed -n 's/^AWS_SECRET_ACCESS_KEY=//p' <<< "$all_text" | head -n1)
[ -n "$s3_endpoint" ] && [ -n "$bucket" ] && [ -n "$access_key" ] && [ -n "$secret_key" ] ||
    die "the guide's blocks name no S3 endpoint (http://), bucket and access key"
s3_hostport=${s3_endpoint#http://}
s3_hostport=${s3_hostport%%/*}
s3_ip=${s3_hostport%:*}
s3_port=${s3_hostport##*:}
[[ $s3_ip =~ ^10\.0\.0\.([3-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9])$ ]] && [[ $s3_port =~ ^[0-9]+$ ]] ||
    die "the guide's S3 endpoint $s3_endpoint is not an address:port in 10.0.0.3-249 the test can be"
echo "S3: $s3_endpoint, bucket $bucket, access key $access_key"

# ---------------------------------------------------------------------------------------------
step "packages the guide installs that this machine lacks: fetching their .deb files"
mkdir -p "$debs/partial"
wanted=$(grep -hE '^[[:space:]]*apt-get install' "${blocks[@]}" |
    sed -E 's/.*apt-get install//' | tr ' ' '\n' | grep -vE '^(-.*|)$' | sort -u || true)
for pkg in $wanted; do
    if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ]; then
        echo "$pkg: installed on this machine"
    elif compgen -G "$debs/${pkg}_*.deb" > /dev/null; then
        echo "$pkg: $(basename "$(compgen -G "$debs/${pkg}_*.deb" | head -n1)")"
    else
        echo "$pkg: downloading into $debs"
        apt-get install -y -qq --download-only --no-install-recommends \
            -o Dir::Cache::Archives="$debs" "$pkg" ||
            die "cannot fetch $pkg (no network? put its .deb files into $debs)"
    fi
done

# ---------------------------------------------------------------------------------------------
step "network: build1 ${ip[build1]}, build2 ${ip[build2]}, the S3 server $s3_ip, one bridge"
ip netns add "$ns_lan"
ip -n "$ns_lan" link add br0 type bridge
ip -n "$ns_lan" link set br0 up
declare -A ns=([build1]=$tag-build1 [build2]=$tag-build2 [s3]=$ns_s3)
declare -A addr=([build1]=${ip[build1]} [build2]=${ip[build2]} [s3]=$s3_ip)
for h in build1 build2 s3; do
    ip netns add "${ns[$h]}"
    ip link add eth0 netns "${ns[$h]}" type veth peer name "v-$h" netns "$ns_lan"
    ip -n "$ns_lan" link set "v-$h" master br0 up
    ip -n "${ns[$h]}" addr add "${addr[$h]}/24" dev eth0
    ip -n "${ns[$h]}" link set eth0 up
    ip -n "${ns[$h]}" link set lo up
    # No default route (no internet here), but multicast on the LAN, as mDNS wants.
    ip -n "${ns[$h]}" route add 224.0.0.0/4 dev eth0
done

# ---------------------------------------------------------------------------------------------
step "the S3 server: SeaweedFS at $s3_endpoint, bucket $bucket, the guide's access key"
mkdir -p "$work/s3/data"
cat > "$work/s3/s3.json" << EOF
{"identities":[{"name":"guide","credentials":[{"accessKey":"$access_key","secretKey":"$secret_key"}],"actions":["Admin","Read","List","Tagging","Write"]},{"name":"anonymous","actions":["Read:$bucket"]}]}
EOF
nsenter --net="/run/netns/$ns_s3" "$weed" mini -dir="$work/s3/data" -ip="$s3_ip" -ip.bind="$s3_ip" \
    -s3.port="$s3_port" -s3.config="$work/s3/s3.json" -bucket="$bucket" -webdav=false \
    -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 < /dev/null > "$work/s3/weed.log" 2>&1 &
weed_pid=$!
disown
deadline=$((SECONDS + 90))
until nsenter --net="/run/netns/$ns_s3" curl -s -m 2 "$s3_endpoint/$bucket/narmesh-probe" 2> /dev/null |
    grep -q NoSuchKey; do
    kill -0 "$weed_pid" 2> /dev/null || die "SeaweedFS exited"
    [ $SECONDS -lt $deadline ] || die "SeaweedFS did not serve the bucket within 90 s"
    sleep 0.5
done
echo "ready"

# ---------------------------------------------------------------------------------------------
step "the hosts: own namespaces, overlays on /etc /usr /var /nix, own /root and /run"
mkdir -p "$work/shims"
cp "$here"/shims/* "$work/shims/"
chmod 0755 "$work"/shims/*
for h in "${hosts[@]}"; do
    d=$work/hosts/$h
    mkdir -p "$d/logs" "$d/root/narmesh"
    chmod 0700 "$d/root"
    for dir in etc usr var nix; do
        mkdir -p "$d/upper/$dir" "$d/work/$dir"
    done
    cp -r "$repo/deploy" "$repo/README.md" "$d/root/narmesh/"
    # The anchor process holds the host's namespaces; blocks enter them with nsenter.
    nsenter --net="/run/netns/${ns[$h]}" unshare --mount --uts --propagation private \
        bash -c '
            set -e
            h=$1 d=$2
            for dir in etc usr var nix; do
                mount -t overlay overlay \
                    -o "lowerdir=/$dir,upperdir=$d/upper/$dir,workdir=$d/work/$dir" "/$dir"
            done
            mount --bind "$d/root" /root
            mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
            install -d -m 1777 /run/lock
            mount -t sysfs sysfs /sys
            hostname "$h"
            echo "$h" > /etc/hostname
            printf "%s build1\n%s build2\n" "$3" "$4" >> /etc/hosts
            touch "$d/ready"
            exec sleep infinity
        ' anchor "$h" "$d" "${ip[build1]}" "${ip[build2]}" < /dev/null > "$d/logs/anchor.log" 2>&1 &
    echo $! > "$d/anchor.pid"
    disown
done
for h in "${hosts[@]}"; do
    deadline=$((SECONDS + 30))
    until [ -e "$work/hosts/$h/ready" ]; do
        kill -0 "$(cat "$work/hosts/$h/anchor.pid")" 2> /dev/null ||
            die "setting up $h failed: $(cat "$work/hosts/$h/logs/anchor.log")"
        [ $SECONDS -lt $deadline ] || die "setting up $h took over 30 s"
        sleep 0.1
    done
done

# Run block file $2 on host $1; its output (also in $3) is shown indented.
run_block() {
    local h=$1 file=$2 out=$3 anchor rc
    anchor=$(cat "$work/hosts/$h/anchor.pid")
    set +e
    timeout --kill-after=10 600 nsenter -t "$anchor" -m -u -n -- env -i \
        HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb LANG=C.UTF-8 \
        PATH="$work/shims:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        GUIDE_TEST_DIR="$work" GUIDE_TEST_BIN_DIR="$bin_dir" GUIDE_TEST_DEBS="$debs" \
        bash -c 'cd /root/narmesh && exec bash -e -o pipefail "$0"' "$file" < /dev/null 2>&1 |
        tee "$out" | sed 's/^/    | /'
    rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}

# ---------------------------------------------------------------------------------------------
doctor_passed=()
n_blocks=${#blocks[@]}
for file in "${blocks[@]}"; do
    n=$(basename "$file" .sh)
    read -r which step_no < "$work/blocks/$n.meta"
    if [ "$which" = both ]; then targets=("${hosts[@]}"); else targets=("$which"); fi
    for h in "${targets[@]}"; do
        step "[$h] block $((10#$n))/$n_blocks, guide step $step_no:"
        sed 's/^/    $ /' "$file"
        out=$work/hosts/$h/logs/block-$n.out
        if grep -q 'narmesh doctor' "$file"; then
            deadline=$((SECONDS + 60))
            until run_block "$h" "$file" "$out" && grep -q '^all checks passed' "$out"; do
                # Only `peer` lines may take a while to pass (the guide says to run it again).
                if grep '^FAIL ' "$out" | grep -qv '^FAIL  peer:'; then
                    die "narmesh doctor failed on $h (above)"
                fi
                [ $SECONDS -lt $deadline ] || die "narmesh doctor on $h did not pass within 60 s"
                echo "    (a peer has not been caught up with yet: the doctor again in 3 s, as the guide says)"
                sleep 3
            done
            doctor_passed+=("$h")
        else
            run_block "$h" "$file" "$out" || die "block $((10#$n)) failed on $h (above)"
        fi
    done
done

for h in "${hosts[@]}"; do
    [[ " ${doctor_passed[*]} " == *" $h "* ]] || die "the guide never ran narmesh doctor on $h"
done

# ---------------------------------------------------------------------------------------------
# Beyond the guide's own words: its example build was substituted on build2, not built, and
# build1's node mirrored it into the bucket.
check_out=
for file in "${blocks[@]}"; do
    n=$(basename "$file" .sh)
    read -r which _ < "$work/blocks/$n.meta"
    if [ "$which" != build1 ] && grep -q 'nix-build' "$file"; then
        check_out=$work/hosts/build2/logs/block-$n.out
    fi
done
if [ -n "$check_out" ]; then
    step "check: build2 substituted the example path from its node"
    path=$(grep -oE "copying path '/nix/store/[^']+' from 'http://127\.0\.0\.1:5480'" "$check_out" |
        head -n1 | sed -E "s/copying path '([^']+)'.*/\1/") ||
        die "build2's nix-build did not substitute from http://127.0.0.1:5480 (see its output above)"
    [ -n "$path" ] || die "build2's nix-build did not substitute from http://127.0.0.1:5480"
    echo "$path"
    step "check: build1's node mirrored it into the bucket"
    hash=$(basename "$path" | cut -d- -f1)
    deadline=$((SECONDS + 60))
    until nsenter --net="/run/netns/$ns_s3" curl -sf -m 5 "$s3_endpoint/$bucket/$hash.narinfo" \
        > "$work/mirrored.narinfo" 2> /dev/null; do
        [ $SECONDS -lt $deadline ] || die "$hash.narinfo is not in the bucket after 60 s"
        sleep 1
    done
    sed 's/^/    | /' "$work/mirrored.narinfo"
fi
