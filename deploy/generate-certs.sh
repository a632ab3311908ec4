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
PROG=generate-certs.sh
# shellcheck source=deploy/certs-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/certs-lib.sh"

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
certs_args "$@"
out=$1
shift
certs_check_specs "client-ca.crt client-ca.key client-ca.srl" "$@"
certs_out_dir "$out" route-ca "the route CA"
CA_CREATED=
certs_make_ca "$out/client-ca.key" "$out/client-ca.crt" "unibus client-facing CA"
[ -z "$CA_CREATED" ] || echo "client CA: $out/client-ca.crt"
for spec in "$@"; do
  node=${spec%%=*}
  san=$(certs_san "${spec#*=}")
  dir="$out/$node"
  mkdir -p "$dir"
  chmod 700 "$dir"
  certs_sign "$dir/server.key" "$dir/server.crt" "$node" "$san" "$out/client-ca.crt" "$out/client-ca.key"
  cp "$out/client-ca.crt" "$dir/client-ca.crt"
  chmod 644 "$dir/client-ca.crt"
  echo "node $node: $dir/server.crt ($san)"
done
chmod 644 "$out/client-ca.crt"
