#!/usr/bin/env bash
# Runs the test directory by hand, to try directory sign-in (docs/identity.md): OpenLDAP slapd
# on loopback with LDAPS, loaded with tests/ldap/directory.ldif. Prints the [auth.ldap] block
# for poort.toml, then serves until Ctrl-C.  Usage: tests/ldap/serve.sh [LDAPS_PORT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
port="${1:-6360}"
plain=$((port + 1))
dir=$(mktemp -d)
trap 'kill "${pid:-0}" 2>/dev/null; rm -rf "$dir"' EXIT
# A server certificate (not a CA: rustls refuses a CA certificate as a server's) for 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=127.0.0.1 \
  -config <(printf '[req]\ndistinguished_name=dn\nx509_extensions=ext\n[dn]\n[ext]\nbasicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
mkdir "$dir/db"
sed "s#@DIR@#$dir#g" "$here/slapd.conf" > "$dir/slapd.conf"
echo service-account-secret > "$dir/bind-password"
/usr/sbin/slapd -d 0 -f "$dir/slapd.conf" -h "ldaps://127.0.0.1:$port/ ldap://127.0.0.1:$plain/" 2>/dev/null &
pid=$!
for _ in $(seq 100); do ldapsearch -x -H "ldap://127.0.0.1:$plain" -s base -b "" >/dev/null 2>&1 && break; sleep 0.1; done
ldapadd -x -H "ldap://127.0.0.1:$plain" -D cn=admin,dc=example,dc=org -w admin-secret -f "$here/directory.ldif" >/dev/null
cat <<TOML
# Add to poort.toml (users: carol, dave; erin is disabled; frank is in no allowed group;
# passwords are NAME-directory-password):

[auth.ldap]
url = "ldaps://127.0.0.1:$port"
ca_file = "$dir/cert.pem"
bind_dn = "cn=poort,ou=services,dc=example,dc=org"
bind_password_file = "$dir/bind-password"
base_dn = "ou=people,dc=example,dc=org"
user_filter = "(uid={user})"
disabled_filter = "(employeeType=disabled)"
group_map = { "engineering" = "staff", "Remote Staff" = "remote" }
allowed_groups = ["remote", "staff"]
TOML
wait "$pid"
