#!/usr/bin/env bash
# Build a dedicated route CA and one route certificate per cluster node.
#
#   deploy/cluster/generate-cluster-certs.sh OUT_DIR NODE=ADDR[,ADDR...] [NODE=ADDR...]
#
# Example (three nodes, each reached by its IP and DNS name):
#   deploy/cluster/generate-cluster-certs.sh ./route-pki \
#       n1=10.0.0.1,n1.example.net n2=10.0.0.2,n2.example.net n3=10.0.0.3,n3.example.net
#
# Writes OUT_DIR/route-ca.crt (give it to every node), OUT_DIR/route-ca.key
# (keep it offline), and OUT_DIR/<node>.crt + OUT_DIR/<node>.key. Each node
# certificate carries serverAuth and clientAuth (nats-server verifies route
# peers both ways) and a SAN for every address given: IP SANs for IPs, DNS
# SANs for names (nats-server may dial a resolved IP, so list the IPs the
# routes use). Private keys are created with mode 0600. The route CA must not
# be the CA of client (data-plane) certificates: membershipd refuses that, and
# this script refuses a directory that holds the client-facing CA of
# deploy/generate-certs.sh (client-ca.crt).
# An existing route CA in OUT_DIR is reused, so the script can add nodes later.
set -euo pipefail
umask 077

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 2 ]; then
  usage >&2
  echo "generate-cluster-certs.sh: give OUT_DIR and at least one NODE=ADDR" >&2
  exit 2
fi
command -v openssl >/dev/null || { echo "generate-cluster-certs.sh: openssl is needed" >&2; exit 2; }

out=$1
shift
if [ -f "$out/client-ca.crt" ] || [ -f "$out/client-ca.key" ]; then
  echo "generate-cluster-certs.sh: $out holds the client-facing CA (client-ca.crt, deploy/generate-certs.sh); keep the route CA in another directory" >&2
  exit 2
fi
mkdir -p "$out"
days=${UNIBUS_CERT_DAYS:-825}

if [ ! -f "$out/route-ca.crt" ]; then
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$out/route-ca.key" -out "$out/route-ca.crt" -days "$((days * 2))" \
    -subj "/CN=unibus route CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  echo "route CA: $out/route-ca.crt"
fi

for spec in "$@"; do
  node=${spec%%=*}
  addrs=${spec#*=}
  case "$node" in
    ""|*[!A-Za-z0-9_.-]*) echo "generate-cluster-certs.sh: bad node name in '$spec' (use NODE=ADDR[,ADDR...])" >&2; exit 2 ;;
  esac
  [ "$addrs" != "$spec" ] && [ -n "$addrs" ] || { echo "generate-cluster-certs.sh: '$spec' has no address (use NODE=ADDR[,ADDR...])" >&2; exit 2; }
  san=""
  IFS=, read -r -a list <<<"$addrs"
  for a in "${list[@]}"; do
    if [[ "$a" =~ ^[0-9.]+$ || "$a" == *:* ]]; then san+="IP:$a,"; else san+="DNS:$a,"; fi
  done
  san=${san%,}
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$out/$node.key" -out "$out/$node.csr" -subj "/CN=$node" 2>/dev/null
  ext=$(mktemp)
  trap 'rm -f "$ext"' EXIT
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$san" >"$ext"
  openssl x509 -req -in "$out/$node.csr" -CA "$out/route-ca.crt" -CAkey "$out/route-ca.key" \
    -CAcreateserial -out "$out/$node.crt" -days "$days" -extfile "$ext" 2>/dev/null
  rm -f "$out/$node.csr" "$ext"
  chmod 600 "$out/$node.key"
  echo "node $node: $out/$node.crt ($san)"
done
chmod 600 "$out/route-ca.key"
