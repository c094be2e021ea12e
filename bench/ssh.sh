#!/usr/bin/env bash
# SSH front door benchmark: 100 MiB copied with scp (SFTP) to and from the same loopback
# sshd, straight and through poort's SSH front door (poort signs in to the target with its
# certificate and relays, recording the transfer's metadata). Rounds alternate between the
# paths so machine drift hits both alike. Prints a Markdown table.
# Usage: bench/ssh.sh [MEBIBYTES] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
mib="${1:-100}"
rounds="${2:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/poort-target}"

need=()
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v scp >/dev/null || need+=(openssh-client)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --locked --quiet
poort="$CARGO_TARGET_DIR/release/poort"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
gw_port=$(port); ssh_port=$(port); target_port=$(port)

# A quickstart gateway with the SSH front door and one target.
(cd "$work" && "$poort" quickstart --no-serve > quickstart.out)
password=$(awk '/Its password, shown only this once/ {getline; getline; print $1}' "$work/quickstart.out")
sed -i "s/8443/$gw_port/g; s/127.0.0.1:9464/127.0.0.1:0/" "$work/poort-data/poort.toml"
printf '%s\n' "" "[ssh]" "listen = \"127.0.0.1:$ssh_port\"" "" "[[ssh_target]]" "name = \"box\"" \
  "address = \"127.0.0.1:$target_port\"" "access = \"authenticated\"" "principals = [\"root\"]" \
  >> "$work/poort-data/poort.toml"

# The target: this machine's sshd on a free port, trusting poort's CA, and the person's own
# key for the straight path.
ssh-keygen -q -t ed25519 -N "" -f "$work/id"
ssh-keygen -q -t ed25519 -N "" -f "$work/host_key"
"$poort" ssh ca --config "$work/poort-data/poort.toml" > "$work/ca.pub" 2>/dev/null
cp "$work/id.pub" "$work/authorized_keys"
printf '%s\n' "Port $target_port" "ListenAddress 127.0.0.1" "HostKey $work/host_key" \
  "TrustedUserCAKeys $work/ca.pub" "AuthorizedKeysFile $work/authorized_keys" "PasswordAuthentication no" \
  "KbdInteractiveAuthentication no" "UsePAM no" "StrictModes no" "PermitRootLogin prohibit-password" \
  "PidFile none" "Subsystem sftp internal-sftp" > "$work/sshd_config"
mkdir -p /run/sshd
/usr/sbin/sshd -D -e -f "$work/sshd_config" 2>/dev/null & pids+=($!)
POORT_LOG=${POORT_LOG:-warn} "$poort" serve --config "$work/poort-data/poort.toml" & pids+=($!)
for _ in $(seq 100); do curl -skf "https://localhost:$gw_port/.poort/health" >/dev/null && break; sleep 0.1; done

# Sign in and register the key on the portal's Security page, as a person's browser would.
origin="https://localhost:$gw_port"
jar="$work/jar"
csrf=$(curl -sk -c "$jar" -b "$jar" "$origin/.poort/login" | sed -n 's/.*name="csrf" value="\([^"]*\)".*/\1/p' | head -1)
curl -sk -c "$jar" -b "$jar" -o /dev/null -H "Origin: $origin" \
  --data-urlencode username=admin --data-urlencode "password=$password" --data-urlencode "csrf=$csrf" "$origin/.poort/login"
curl -sk -c "$jar" -b "$jar" -o /dev/null -H "Origin: $origin" -H "Referer: $origin/.poort/security" \
  -H "Sec-Fetch-Site: same-origin" -H "Sec-Fetch-Mode: navigate" -H "Sec-Fetch-Dest: document" -H "Sec-Fetch-User: ?1" \
  --data-urlencode "key=$(cat "$work/id.pub")" --data-urlencode name=bench --data-urlencode "csrf=$csrf" \
  "$origin/.poort/security/ssh/add"

head -c "$((mib * 1024 * 1024))" /dev/urandom > "$work/payload"
opts=(-q -i "$work/id" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null)
run() { # path direction -> seconds
  local dest
  case $1 in direct) dest=(-P "$target_port" "root@127.0.0.1") ;; poort) dest=(-P "$ssh_port" "admin+box@127.0.0.1") ;; esac
  local start end
  start=$(date +%s.%N)
  if [ "$2" = up ]; then scp "${opts[@]}" "${dest[0]}" "${dest[1]}" "$work/payload" "${dest[2]}:$work/up-$1"
  else scp "${opts[@]}" "${dest[0]}" "${dest[1]}" "${dest[2]}:$work/payload" "$work/down-$1"; fi
  end=$(date +%s.%N)
  cmp -s "$work/payload" "$work/$2-$1" || { echo "the $1 $2 copy differs" >&2; exit 1; }
  rm -f "$work/$2-$1"
  python3 -c "print($end - $start)"
}
run poort up >/dev/null  # warm up, and fail early if the front door does not work

declare -A secs
for _ in $(seq "$rounds"); do
  for dir in up down; do
    for path in direct poort; do secs[$path-$dir]+="$(run "$path" "$dir") "; done
  done
done

python3 - "$mib" "$rounds" "${secs[direct-up]}" "${secs[poort-up]}" "${secs[direct-down]}" "${secs[poort-down]}" <<'PY'
import statistics, sys
mib, rounds = int(sys.argv[1]), int(sys.argv[2])
rows = {}
for name, raw in zip(["direct up", "poort up", "direct down", "poort down"], sys.argv[3:]):
    rows[name] = sorted(mib / float(s) for s in raw.split())
print(f"scp (SFTP) of {mib} MiB, {rounds} rounds, paths alternating; MiB/s median (min–max)\n")
print("| direction | direct | through poort | ratio |")
print("| --- | --- | --- | --- |")
for d, label in [("up", "upload"), ("down", "download")]:
    a, b = rows[f"direct {d}"], rows[f"poort {d}"]
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"| {label} | {ma:.0f} ({a[0]:.0f}–{a[-1]:.0f}) | {mb:.0f} ({b[0]:.0f}–{b[-1]:.0f}) | {mb / ma:.2f}x |")
PY
