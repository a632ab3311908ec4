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
PROG=generate-cluster-certs.sh
# shellcheck source=deploy/certs-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../certs-lib.sh"

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
certs_args "$@"
out=$1
shift
certs_check_specs "route-ca route-ca.srl" "$@"
certs_out_dir "$out" client-ca "the client-facing CA of deploy/generate-certs.sh"
CA_CREATED=
certs_make_ca "$out/route-ca.key" "$out/route-ca.crt" "unibus route CA"
[ -z "$CA_CREATED" ] || echo "route CA: $out/route-ca.crt"
for spec in "$@"; do
  node=${spec%%=*}
  san=$(certs_san "${spec#*=}")
  certs_sign "$out/$node.key" "$out/$node.crt" "$node" "$san" "$out/route-ca.crt" "$out/route-ca.key"
  echo "node $node: $out/$node.crt ($san)"
done
chmod 644 "$out/route-ca.crt"
