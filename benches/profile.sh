#!/usr/bin/env bash
# Where keygate's user-space instructions go per request: keygate (release build)
# under callgrind, in front of a one-worker nginx answering 1 KiB of JSON, driven
# by h2load over 16 HTTP/1.1 connections. Only the measured requests are counted
# (instrumentation is switched on after a warm-up).
#
#   benches/profile.sh                    # passthrough route, no audit record
#   MODE=bypass benches/profile.sh        # bypass route, durable write-ahead record
#   N=5000 TOP=40 benches/profile.sh
#   CONNS=256 N=20000 benches/profile.sh  # more connections (default 16)
#
# Needs: nginx, h2load (nghttp2-client), valgrind. Prints the top functions by
# inclusive and by self cost per request; the callgrind file stays in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-passthrough}
N=${N:-5000}
TOP=${TOP:-45}
CONNS=${CONNS:-16}
OUT=$(mktemp -d /tmp/keygate-profile.XXXXXX)
UPSTREAM_PORT=${UPSTREAM_PORT:-18180}
PORT=${PORT:-18190}
cargo build --release --quiet
BIN=$PWD/target/release/keygate
case $MODE in bypass) bypass=true ;; *) bypass=false ;; esac

cat > "$OUT/upstream.conf" <<NGINX
worker_processes 1;
daemon off;
pid $OUT/upstream.pid;
error_log $OUT/upstream.error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path $OUT/tmp;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        default_type application/json;
        location = /wiki/api/v2/admin-key {
            return 200 '{"accountId":"bench-admin","expirationTime":"2099-01-01T00:00:00.000Z"}';
        }
        location / {
            return 200 '{"status":"ok","pad":"$(head -c 960 /dev/zero | tr '\0' x)"}';
        }
    }
}
NGINX
nginx -c "$OUT/upstream.conf" -p "$OUT" &
upstream=$!
cat > "$OUT/keygate.yaml" <<YAML
listen:
  address: 127.0.0.1:$PORT
confluence:
  base_url: http://127.0.0.1:$UPSTREAM_PORT
  allow_http: true
  email: confluence-admin
  api_token: upstream-secret
admin_key:
  idle_disable_after: never
  disable_on_shutdown: false
clients:
  keys_file: $OUT/keys.yaml
routes:
  - name: bench
    methods: [GET]
    path: /**
    roles: [bench]
    admin_key: $bypass
audit:
  path: $OUT/audit.jsonl
  rotate_size: 1GiB
  record_passthrough: false
limits:
  per_client_rps: 0
YAML
echo "keys: []" > "$OUT/keys.yaml"
out=$(printf 'Bench-Secret-42\n' | "$BIN" keys create --config "$OUT/keygate.yaml" --name bench --role bench --secret-stdin)
client_id=$(grep -oE 'bench_[a-z0-9]{25}' <<<"$out" | head -1)
auth="Basic $(printf '%s:%s' "$client_id" 'Bench-Secret-42' | base64 -w0)"
taskset -c "${PROXY_CPU:-1}" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out" \
    "$BIN" --log-format json run --config "$OUT/keygate.yaml" 2>"$OUT/keygate.log" &
keygate=$!
trap 'kill $keygate $upstream 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do
    curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break
    sleep 0.1
done
h2load --h1 -c"$CONNS" -n 500 -H "authorization: $auth" "http://127.0.0.1:$PORT/wiki/x" >/dev/null
callgrind_control -i on "$keygate" >/dev/null
h2load --h1 -c"$CONNS" -n "$N" -H "authorization: $auth" "http://127.0.0.1:$PORT/wiki/x" | grep -E "requests:|status codes"
callgrind_control -i off "$keygate" >/dev/null
callgrind_control -d "$keygate" >/dev/null
sleep 1
file=$(ls -t "$OUT"/callgrind.out* | head -1)
total=$(callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
echo "== $MODE: $((total / N)) instructions/request over $N requests ($file)"
echo "== inclusive, per request"
callgrind_annotate --inclusive=yes "$file" 2>/dev/null | grep -E '^ *[0-9,]+ ' | head -"$TOP" \
    | awk -v n="$N" '{c=$1; gsub(",","",c); $1=""; printf "%9d %s\n", c/n, $0}'
echo "== self, per request"
callgrind_annotate "$file" 2>/dev/null | grep -E '^ *[0-9,]+ ' | head -"$TOP" \
    | awk -v n="$N" '{c=$1; gsub(",","",c); $1=""; printf "%9d %s\n", c/n, $0}'
