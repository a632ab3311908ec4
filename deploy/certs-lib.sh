# deploy/certs-lib.sh: what deploy/generate-certs.sh and
# deploy/cluster/generate-cluster-certs.sh share (sourced, not run).
#
# Each script sets PROG (its name, for messages) and calls, in this order:
#   certs_args "$@"          usage/--help, openssl present, at least OUT_DIR and one NODE=ADDR
#   certs_check_specs RESERVED "$@"   every NODE=ADDR checked before anything is written
#   certs_out_dir OUT OTHER_CA WHAT   OUT (0700), refused if it holds the other CA's certificate or key
#   certs_make_ca KEY CRT CN  a P-256 CA (kept if it exists), key 0600
#   certs_sign KEY CRT CSR_DIR NODE SAN CA_CRT CA_KEY   one node certificate
# UNIBUS_CERT_DAYS (default 825) is each node certificate's lifetime; a CA lives twice as long.

certs_die() { echo "$PROG: $*" >&2; exit 2; }

certs_args() {
  case "${1:-}" in -h|--help) usage; exit 0 ;; esac
  if [ $# -lt 2 ]; then
    usage >&2
    certs_die "give OUT_DIR and at least one NODE=ADDR"
  fi
  command -v openssl >/dev/null || certs_die "openssl is needed"
  CERT_DAYS=${UNIBUS_CERT_DAYS:-825}
  case "$CERT_DAYS" in ""|*[!0-9]*|0) certs_die "UNIBUS_CERT_DAYS must be a number of days" ;; esac
}

# certs_check_specs "RESERVED NAMES" NODE=ADDR...: a node name is letters, digits, _ . -, not . or ..,
# and none of the reserved names (the CA's own files), compared without case (a case-insensitive file
# system would write ROUTE-CA.key over route-ca.key); every spec has at least one address, and each
# address is a host name or an IP address (letters, digits, . - and : only: nothing that openssl's
# config syntax would cut or expand, such as # or $).
certs_check_specs() {
  local reserved=$1 spec node addrs r a list
  shift
  for spec in "$@"; do
    node=${spec%%=*}
    addrs=${spec#*=}
    case "$node" in
      ""|*[!A-Za-z0-9_.-]*|.|..) certs_die "bad node name in '$spec' (use NODE=ADDR[,ADDR...])" ;;
    esac
    for r in $reserved; do
      [ "${node,,}" != "${r,,}" ] || certs_die "node name '$node' is the CA's own file name; choose another"
    done
    [ "$addrs" != "$spec" ] && [ -n "${addrs//,/}" ] || certs_die "'$spec' has no address (use NODE=ADDR[,ADDR...])"
    IFS=, read -r -a list <<<"$addrs"
    for a in "${list[@]}"; do
      case "$a" in
        *[!A-Za-z0-9.:-]*|-*|.*) certs_die "bad address '$a' in '$spec' (a host name or an IP address)" ;;
      esac
    done
  done
}

# certs_out_dir OUT OTHER_CA WHAT: make OUT (0700) unless it holds OTHER_CA.crt or OTHER_CA.key (the CA
# of the other generator: the two must not share a directory); WHAT names it in the refusal.
certs_out_dir() {
  local out=$1 other=$2 what=$3
  if [ -f "$out/$other.crt" ] || [ -f "$out/$other.key" ]; then
    certs_die "$out holds $what ($other.crt); keep the two CAs in separate directories"
  fi
  mkdir -p "$out"
  chmod 700 "$out"
}

# certs_san ADDR[,ADDR...]: the subjectAltName value, IP: for addresses, DNS: for names.
certs_san() {
  local san="" a list
  IFS=, read -r -a list <<<"$1"
  for a in "${list[@]}"; do
    [ -n "$a" ] || continue
    if [[ "$a" =~ ^[0-9.]+$ || "$a" == *:* ]]; then san+="IP:$a,"; else san+="DNS:$a,"; fi
  done
  echo "${san%,}"
}

certs_make_ca() {
  local key=$1 crt=$2 cn=$3
  if [ ! -f "$crt" ]; then
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
      -keyout "$key" -out "$crt" -days "$((CERT_DAYS * 2))" -subj "/CN=$cn" \
      -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    CA_CREATED=1
  fi
  chmod 600 "$key"
}

# certs_sign KEY CRT NODE SAN CA_CRT CA_KEY: a P-256 key (0600) and a certificate for serverAuth and
# clientAuth (nats-server verifies peers both ways) with the SAN given, signed by the CA.
certs_sign() {
  local key=$1 crt=$2 node=$3 san=$4 ca_crt=$5 ca_key=$6 ext csr err
  ext=$(mktemp)
  csr=$(mktemp)
  err=$(mktemp)
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$san" >"$ext"
  if ! { openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
           -keyout "$key" -out "$csr" -subj "/CN=$node" 2>"$err" &&
         openssl x509 -req -in "$csr" -CA "$ca_crt" -CAkey "$ca_key" \
           -CAcreateserial -out "$crt" -days "$CERT_DAYS" -extfile "$ext" 2>"$err"; }; then
    echo "$PROG: openssl could not make the certificate of node $node ($san):" >&2
    cat "$err" >&2
    rm -f "$ext" "$csr" "$err" "$key" "$crt"
    exit 1
  fi
  rm -f "$ext" "$csr" "$err"
  chmod 600 "$key"
  chmod 644 "$crt"
}
