#!/usr/bin/env bash
# Build the client-facing CA and one server certificate per membershipd node.
#
#   deploy/generate-certs.sh OUT_DIR NODE=ADDR[,ADDR...] [NODE=ADDR...]
#
# Example (three nodes, each reached by its IP and DNS name):
#   deploy/generate-certs.sh ./client-pki \
#       n1=10.0.0.1,n1.example.net n2=10.0.0.2,n2.example.net n3=10.0.0.3,n3.example.net
#
# Writes OUT_DIR/client-ca.crt (give it to every member: unibus --ca), OUT_DIR/
# client-ca.key (keep it offline), and for each node a directory OUT_DIR/NODE/
# holding server.crt, server.key and a copy of client-ca.crt: copy that
# directory's files to the node's ~/.config/unibus/tls/, where both systemd
# units look for them. The certificate serves HTTPS (--http-tls-cert) and the
# NATS client listener (--tls-cert); it carries serverAuth and clientAuth
# (membershipd presents it to its own NATS listener when that verifies
# clients) and a SAN for every address given: IP SANs for IPs, DNS SANs for
# names. List every name and address members use to reach the node.
# Private keys are created with mode 0600, directories 0700.
# This CA is NOT the route CA of deploy/cluster/generate-cluster-certs.sh
# (route-ca.crt, NODE.crt): the file names differ so the two cannot be mixed
# up, and membershipd refuses a route CA that is the client CA.
# An existing client CA in OUT_DIR is reused, so the script can add nodes
# later; an existing node certificate is replaced.
set -euo pipefail
umask 077

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 2 ]; then
  usage >&2
  echo "generate-certs.sh: give OUT_DIR and at least one NODE=ADDR" >&2
  exit 2
fi
command -v openssl >/dev/null || { echo "generate-certs.sh: openssl is needed" >&2; exit 2; }

out=$1
shift
days=${UNIBUS_CERT_DAYS:-825}
case "$days" in ""|*[!0-9]*) echo "generate-certs.sh: UNIBUS_CERT_DAYS must be a number of days" >&2; exit 2 ;; esac

# Check every NODE=ADDR before writing anything.
for spec in "$@"; do
  node=${spec%%=*}
  addrs=${spec#*=}
  case "$node" in
    ""|*[!A-Za-z0-9_.-]*|.|..) echo "generate-certs.sh: bad node name in '$spec' (use NODE=ADDR[,ADDR...])" >&2; exit 2 ;;
  esac
  [ "$addrs" != "$spec" ] && [ -n "$addrs" ] || { echo "generate-certs.sh: '$spec' has no address (use NODE=ADDR[,ADDR...])" >&2; exit 2; }
done

mkdir -p "$out"
chmod 700 "$out"
if [ -f "$out/route-ca.crt" ] || [ -f "$out/route-ca.key" ]; then
  echo "generate-certs.sh: $out holds the route CA (route-ca.crt); keep the client CA in another directory" >&2
  exit 2
fi

if [ ! -f "$out/client-ca.crt" ]; then
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$out/client-ca.key" -out "$out/client-ca.crt" -days "$((days * 2))" \
    -subj "/CN=unibus client-facing CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  echo "client CA: $out/client-ca.crt"
fi
chmod 600 "$out/client-ca.key"

ext=$(mktemp)
trap 'rm -f "$ext"' EXIT
for spec in "$@"; do
  node=${spec%%=*}
  addrs=${spec#*=}
  san=""
  IFS=, read -r -a list <<<"$addrs"
  for a in "${list[@]}"; do
    [ -n "$a" ] || continue
    if [[ "$a" =~ ^[0-9.]+$ || "$a" == *:* ]]; then san+="IP:$a,"; else san+="DNS:$a,"; fi
  done
  san=${san%,}
  dir="$out/$node"
  mkdir -p "$dir"
  chmod 700 "$dir"
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/server.key" -out "$dir/server.csr" -subj "/CN=$node" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$san" >"$ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$out/client-ca.crt" -CAkey "$out/client-ca.key" \
    -CAcreateserial -out "$dir/server.crt" -days "$days" -extfile "$ext" 2>/dev/null
  rm -f "$dir/server.csr"
  cp "$out/client-ca.crt" "$dir/client-ca.crt"
  chmod 600 "$dir/server.key"
  chmod 644 "$dir/server.crt" "$dir/client-ca.crt"
  echo "node $node: $dir/server.crt ($san)"
done
chmod 644 "$out/client-ca.crt"
