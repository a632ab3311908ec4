#!/usr/bin/env bash
# deploy/install.sh: install unibus membershipd as a systemd *user* service.
#
# Idempotent. Running it again is harmless: an existing venv is reused, pip
# reinstalls the checkout, the unit link/copy is refreshed, and "enable --now"
# leaves an already running service alone (restart it yourself to pick up new
# code; in a cluster, follow the rolling-restart runbook).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/install.sh [--dry-run] [--cluster] [--nats-monitor] [--help]

Install unibus membershipd from the checkout that holds this script (the "app
directory") as a systemd user service:
  1. create <app>/.venv with "python3 -m venv" (if it does not exist)
  2. pip install the app into it
  3. TLS (single node, when ~/.config/unibus/tls/server.crt or server.key is
     missing): deploy/generate-certs.sh makes a client-facing CA in
     ~/.config/unibus/pki and a certificate for this host (localhost, its
     names and addresses); server.crt, server.key (0600) and client-ca.crt
     are installed into ~/.config/unibus/tls/, where the unit reads them.
     Members verify the server with: unibus --ca client-ca.crt
     (--cluster: nothing is generated; copy the node's files made once for
     the whole cluster, see deploy/cluster/README.md)
  4. link the unit into ~/.config/systemd/user/ (a symlink if the checkout is
     ~/unibus, otherwise a copy with %h/unibus replaced by the checkout path)
  5. systemctl --user daemon-reload
  6. systemctl --user enable --now <unit>

Options:
  --dry-run       print each step ("would run: ...") and change nothing
  --cluster       install membershipd-cluster.service (a cluster node) and its
                  drop-in directory instead of unibus-membershipd.service.
                  Needs ~/.config/unibus/cluster.env (see
                  deploy/cluster/README.md). If that file is missing, the unit
                  is enabled but not started.
  --nats-monitor  also link the nats-monitor.conf drop-in (UNIBUS_NATS_MONITOR=1,
                  loopback-only NATS monitor). Takes effect at the next
                  restart, which this script does not do for you.
  -h, --help      show this help and exit

Environment: PYTHON (default python3) creates the venv.
Exit codes: 0 done, 1 a step failed, 2 bad usage or an unusable app path.
EOF
}

DRY_RUN=0
CLUSTER=0
NATS_MONITOR=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --cluster) CLUSTER=1 ;;
        --nats-monitor) NATS_MONITOR=1 ;;
        -h|--help) usage; exit 0 ;;
        *) printf 'install.sh: unknown argument: %s (see --help)\n' "$1" >&2; exit 2 ;;
    esac
    shift
done

: "${HOME:?install.sh: HOME is not set}"
PYTHON="${PYTHON:-python3}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
APP_DIR="$(cd "$SCRIPT_DIR/.." && pwd -P)"
VENV="$APP_DIR/.venv"
UNIT_DIR="$HOME/.config/systemd/user"
CLUSTER_ENV="$HOME/.config/unibus/cluster.env"
# Both units serve HTTPS and tls:// with the files in TLS_DIR (see the units).
TLS_DIR="$HOME/.config/unibus/tls"
PKI_DIR="$HOME/.config/unibus/pki"

if [ "$CLUSTER" -eq 1 ]; then
    UNIT=membershipd-cluster.service
else
    UNIT=unibus-membershipd.service
fi
UNIT_SRC="$SCRIPT_DIR/$UNIT"
DROPIN_DIR="$UNIT_DIR/$UNIT.d"
MONITOR_SRC="$SCRIPT_DIR/membershipd-cluster.service.d/nats-monitor.conf"

# The unit templates name the app directory "%h/unibus". A path that a unit file
# or the sed replacement below would mangle (whitespace, %, |, &, \ ...) is refused.
case "$APP_DIR" in
    *[!A-Za-z0-9._/+@-]*)
        printf 'install.sh: the checkout path %s contains characters a systemd unit cannot hold as-is; move the checkout to a path of letters, digits and ._/+@- (e.g. ~/unibus)\n' "$APP_DIR" >&2
        exit 2 ;;
esac
[ -f "$UNIT_SRC" ] || { printf 'install.sh: missing %s\n' "$UNIT_SRC" >&2; exit 1; }

say() { printf '%s\n' "$*"; }

# run CMD...: one line per step; in dry-run only the line.
run() {
    local line
    line="$(printf '%q ' "$@")"
    line="${line% }"
    if [ "$DRY_RUN" -eq 1 ]; then
        say "would run: $line"
    else
        say "+ $line"
        "$@"
    fi
}

# 1. venv
if [ -x "$VENV/bin/python" ]; then
    say "ok: venv exists: $VENV (reused)"
else
    if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        if [ "$DRY_RUN" -eq 1 ]; then
            say "warning: $PYTHON is missing or older than 3.11; a real run would stop here"
        else
            printf 'install.sh: %s is missing or older than Python 3.11; set PYTHON=/path/to/python3.11+\n' "$PYTHON" >&2
            exit 1
        fi
    fi
    run "$PYTHON" -m venv "$VENV"
fi

# 2. install the app (a regular, non-editable install of this checkout)
run "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input "$APP_DIR"

# 3. TLS: the unit serves HTTPS and tls:// with TLS_DIR/server.crt and server.key.
if [ -f "$TLS_DIR/server.crt" ] && [ -f "$TLS_DIR/server.key" ]; then
    say "ok: TLS certificate exists: $TLS_DIR/server.crt (reused)"
    if [ -n "$(find "$TLS_DIR/server.key" -perm /077 2>/dev/null)" ]; then
        say "warning: $TLS_DIR/server.key is readable by group/others; membershipd refuses it: chmod 600 it"
    fi
elif [ "$CLUSTER" -eq 1 ]; then
    say "note: $TLS_DIR/server.crt and server.key are missing: a cluster node uses the certificate made for it"
    say "note: by deploy/generate-certs.sh with the cluster's one client CA (deploy/cluster/README.md, Client TLS)"
else
    node="$(hostname -s 2>/dev/null || true)"
    node="${node//[!A-Za-z0-9_.-]/}"
    [ -n "$node" ] || node=node
    addrs="127.0.0.1,::1,localhost"
    for name in "$(hostname 2>/dev/null || true)" "$(hostname -f 2>/dev/null || true)"; do
        case ",$addrs," in *",$name,"*) ;; *) [ -n "$name" ] && [[ "$name" != *[!A-Za-z0-9_.:-]* ]] && addrs="$addrs,$name" ;; esac
    done
    for ip in $(hostname -I 2>/dev/null || true); do
        case ",$addrs," in *",$ip,"*) ;; *) [[ "$ip" != *[!0-9A-Fa-f.:]* ]] && addrs="$addrs,$ip" ;; esac
    done
    (
        umask 077
        run mkdir -p "$TLS_DIR"
        run chmod 700 "$TLS_DIR"
        run bash "$SCRIPT_DIR/generate-certs.sh" "$PKI_DIR" "$node=$addrs"
        # cp onto an existing file keeps that file's mode (and follows a link there): a stale
        # 0644 server.key would receive the new private key. New files get the umask's 0600.
        run rm -f "$TLS_DIR/server.key" "$TLS_DIR/server.crt" "$TLS_DIR/client-ca.crt"
        run cp "$PKI_DIR/$node/server.key" "$TLS_DIR/server.key"
        run cp "$PKI_DIR/$node/server.crt" "$TLS_DIR/server.crt"
        run cp "$PKI_DIR/$node/client-ca.crt" "$TLS_DIR/client-ca.crt"
    )
    say "note: members verify this server with: unibus --server https://$(hostname 2>/dev/null || echo HOST):8470 --ca $TLS_DIR/client-ca.crt"
    say "note: keep $PKI_DIR/client-ca.key (the CA's key) offline once you have made the certificates you need"
fi

# 4. the unit
if [ -d "$UNIT_DIR" ]; then
    say "ok: unit directory exists: $UNIT_DIR"
else
    run mkdir -p "$UNIT_DIR"
fi

DEST="$UNIT_DIR/$UNIT"
home_app="$(cd "$HOME/unibus" 2>/dev/null && pwd -P || true)"
if [ "$home_app" = "$APP_DIR" ]; then
    # The checkout is ~/unibus: the template's %h/unibus is right as it is.
    if [ -L "$DEST" ] && [ "$(readlink "$DEST")" = "$UNIT_SRC" ]; then
        say "ok: unit already linked: $DEST -> $UNIT_SRC"
    else
        run ln -sf "$UNIT_SRC" "$DEST"
    fi
else
    # Elsewhere: install a copy with %h/unibus replaced by the checkout path.
    if [ -f "$DEST" ] && [ ! -L "$DEST" ] && sed -e "s|%h/unibus|$APP_DIR|g" "$UNIT_SRC" | cmp -s - "$DEST"; then
        say "ok: unit copy up to date: $DEST (%h/unibus -> $APP_DIR)"
    elif [ "$DRY_RUN" -eq 1 ]; then
        say "would run: sed -e 's|%h/unibus|$APP_DIR|g' $UNIT_SRC > $DEST  (link a copy of the unit with the checkout path)"
    else
        say "+ sed -e 's|%h/unibus|$APP_DIR|g' $UNIT_SRC > $DEST  (link a copy of the unit with the checkout path)"
        tmp="$DEST.tmp.$$"
        sed -e "s|%h/unibus|$APP_DIR|g" "$UNIT_SRC" > "$tmp"
        chmod 0644 "$tmp"
        mv -f "$tmp" "$DEST"
    fi
fi

# Drop-in directory (cluster) and the optional monitor drop-in.
if [ "$CLUSTER" -eq 1 ] || [ "$NATS_MONITOR" -eq 1 ]; then
    if [ -d "$DROPIN_DIR" ]; then
        say "ok: drop-in directory exists: $DROPIN_DIR"
    else
        run mkdir -p "$DROPIN_DIR"
    fi
fi
if [ "$NATS_MONITOR" -eq 1 ]; then
    if [ -L "$DROPIN_DIR/nats-monitor.conf" ] && [ "$(readlink "$DROPIN_DIR/nats-monitor.conf")" = "$MONITOR_SRC" ]; then
        say "ok: drop-in already linked: $DROPIN_DIR/nats-monitor.conf"
    else
        run ln -sf "$MONITOR_SRC" "$DROPIN_DIR/nats-monitor.conf"
    fi
fi

# 5./6. systemd
if [ "$DRY_RUN" -eq 0 ] && ! command -v systemctl >/dev/null 2>&1; then
    printf 'install.sh: systemctl not found; this host has no systemd to run the unit\n' >&2
    exit 1
fi
run systemctl --user daemon-reload

if [ "$CLUSTER" -eq 1 ] && [ ! -f "$CLUSTER_ENV" ]; then
    say "note: $CLUSTER_ENV is missing, so the unit is enabled but not started;"
    say "note: create it (deploy/cluster/README.md), then: systemctl --user start $UNIT"
    run systemctl --user enable "$UNIT"
else
    if [ "$CLUSTER" -eq 1 ] && [ -n "$(find "$CLUSTER_ENV" -perm /077 2>/dev/null)" ]; then
        say "warning: $CLUSTER_ENV is readable by group/others; chmod 600 it"
    fi
    run systemctl --user enable --now "$UNIT"
fi

if [ "$CLUSTER" -eq 1 ]; then OTHER=unibus-membershipd.service; else OTHER=membershipd-cluster.service; fi
if [ -e "$UNIT_DIR/$OTHER" ] || [ -L "$UNIT_DIR/$OTHER" ]; then
    say "warning: $OTHER is installed too; both bind 8470 and 4250. Keep one: systemctl --user disable --now $OTHER"
fi
if [ ! -e "/var/lib/systemd/linger/$(id -un)" ]; then
    say "note: lingering is off for $(id -un); the service stops at logout unless you run: loginctl enable-linger $(id -un)"
fi
if [ "$NATS_MONITOR" -eq 1 ]; then
    say "note: the monitor drop-in takes effect at the next restart of $UNIT (cluster: one node at a time, see deploy/cluster/README.md)"
fi
if [ "$DRY_RUN" -eq 1 ]; then
    say "dry run: nothing was changed"
fi
