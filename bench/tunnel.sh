#!/usr/bin/env bash
# Tunnel benchmark: bulk throughput and small round trips, measured in one run on this
# machine for three paths to the same loopback target:
#   direct   client → target
#   socat    client → socat (plain TCP relay) → target
#   poort    client → poort connect --listen → TLS + WebSocket → poort gateway → target
# Rounds alternate between the paths so machine drift hits all alike. Prints a Markdown table.
# Usage: bench/tunnel.sh [SECONDS_PER_ROUND] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
rounds="${2:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/poort-target}"

need=()
command -v socat >/dev/null || need+=(socat)
command -v iperf3 >/dev/null || need+=(iperf3)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --locked --quiet
poort="$CARGO_TARGET_DIR/release/poort"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

iperf_port=$(port); echo_port=$(port); gw_port=$(port)
iperf3 -s -B 127.0.0.1 -p "$iperf_port" >/dev/null 2>&1 & pids+=($!)
python3 bench/rtt.py serve "$echo_port" & pids+=($!)

relay_iperf=$(port); relay_echo=$(port)
socat "TCP-LISTEN:$relay_iperf,bind=127.0.0.1,fork,reuseaddr" "TCP:127.0.0.1:$iperf_port" & pids+=($!)
socat "TCP-LISTEN:$relay_echo,bind=127.0.0.1,fork,reuseaddr" "TCP:127.0.0.1:$echo_port" & pids+=($!)

# A quickstart gateway with two tunnels, and the command line signed in to it.
(cd "$work" && "$poort" quickstart --no-serve > quickstart.out)
password=$(awk '/Its password, shown only this once/ {getline; getline; print $1}' "$work/quickstart.out")
fingerprint=$(sed -n 's/^Certificate SHA-256 fingerprint: //p' "$work/quickstart.out")
sed -i "s/8443/$gw_port/g" "$work/poort-data/poort.toml"
cat >> "$work/poort-data/poort.toml" <<TOML

[[tunnel]]
name = "iperf"
target = "127.0.0.1:$iperf_port"
access = "authenticated"

[[tunnel]]
name = "echo"
target = "127.0.0.1:$echo_port"
access = "authenticated"
TOML
POORT_LOG=warn "$poort" serve --config "$work/poort-data/poort.toml" & pids+=($!)
for _ in $(seq 100); do curl -skf "https://localhost:$gw_port/.poort/health" >/dev/null && break; sleep 0.1; done
jar="$work/jar"
csrf=$(curl -sk -c "$jar" -b "$jar" "https://localhost:$gw_port/.poort/login" | sed -n 's/.*name="csrf" value="\([^"]*\)".*/\1/p' | head -1)
curl -sk -c "$jar" -b "$jar" -o /dev/null -H "Origin: https://localhost:$gw_port" \
  --data-urlencode username=admin --data-urlencode "password=$password" --data-urlencode "csrf=$csrf" \
  "https://localhost:$gw_port/.poort/login"
token=$(awk '$6 == "__Host-poort" {print $7}' "$jar")
export XDG_CONFIG_HOME="$work/config"
mkdir -p "$XDG_CONFIG_HOME/poort"
printf '{"gateway":"https://localhost:%s","token":"%s","user":"admin","expires_at":0,"fingerprint":"%s"}' \
  "$gw_port" "$token" "$fingerprint" > "$XDG_CONFIG_HOME/poort/credentials.json"
tunnel_iperf=$(port); tunnel_echo=$(port)
POORT_LOG=warn "$poort" connect iperf --listen "127.0.0.1:$tunnel_iperf" 2>/dev/null & pids+=($!)
POORT_LOG=warn "$poort" connect echo --listen "127.0.0.1:$tunnel_echo" 2>/dev/null & pids+=($!)
sleep 1

declare -A gbps rtt p99
for r in $(seq "$rounds"); do
  for path in direct socat poort; do
    case $path in
      direct) ip=$iperf_port; ep=$echo_port ;;
      socat) ip=$relay_iperf; ep=$relay_echo ;;
      poort) ip=$tunnel_iperf; ep=$tunnel_echo ;;
    esac
    bps=$(iperf3 -c 127.0.0.1 -p "$ip" -t "$secs" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])')
    gbps[$path]+="$(python3 -c "print(f'{$bps/1e9:.2f}')") "
    read -r med tail < <(python3 bench/rtt.py measure "$ep" 2000)
    rtt[$path]+="$med "
    p99[$path]+="$tail "
  done
done

median() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(f'{statistics.median(v):g} ({min(v):g}–{max(v):g})')" "$@"; }
med_only() { python3 -c "import statistics,sys; print(statistics.median([float(x) for x in sys.argv[1:]]))" "$@"; }
socat_med=$(med_only ${gbps[socat]})
direct_rtt=$(med_only ${rtt[direct]})
echo "| path | throughput Gbit/s, median (min–max) | ratio to socat | round trip µs, median | p99 µs | added vs direct µs |"
echo "| --- | --- | --- | --- | --- | --- |"
for path in direct socat poort; do
  m=$(med_only ${gbps[$path]})
  r=$(med_only ${rtt[$path]})
  echo "| $path | $(median ${gbps[$path]}) | $(python3 -c "print(f'{$m/$socat_med:.2f}x')") | $(median ${rtt[$path]}) | $(med_only ${p99[$path]}) | $(python3 -c "print(f'{$r-$direct_rtt:.0f}')") |"
done
echo
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r); rounds: $rounds × ${secs}s; command: bench/tunnel.sh $secs $rounds"
