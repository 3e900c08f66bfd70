#!/usr/bin/env bash
# The munge daemon the local clusters (launch/local_slurm, launch/local_cluster) share: sourced by their start.sh and
# stop.sh. There is one munged per machine (one socket, /run/munge), so two clusters up at once use the same one.
# When no munge daemon answers, munge_start starts it and records that it did; each cluster that uses such a munged
# is registered in /run/pixelz-munge (a file named after its DIR); munge_stop removes the cluster's registration and
# stops munged only when it was started here and no other cluster still uses it. A munged started by something else
# (a service) is used and never stopped. Registration and check happen under one lock (flock), so a cluster that
# starts while another stops never loses its daemon.
#
# Creates outside DIR: /run/munge, /var/log/munge, /var/lib/munge (as the munge package's service would) when it
# starts munged, and /run/pixelz-munge.

MUNGE_USERS=/run/pixelz-munge

munge_answers() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

munge_user_file() { printf '%s/%s' "$MUNGE_USERS" "$(printf '%s' "$1" | md5sum | cut -c1-16)"; }

munge_start() {  # DIR: the cluster's folder
    local dir="$1"
    mkdir -p "$MUNGE_USERS"
    (
        flock 9
        if ! munge_answers; then  # no systemd here: create its folders and start it as the munge user
            install -d -o munge -g munge -m 0755 /run/munge
            install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
            runuser -u munge -- munged
            touch "$MUNGE_USERS/.started"
            for _ in $(seq 50); do munge_answers && break; sleep 0.1; done
        fi
        if [ -f "$MUNGE_USERS/.started" ]; then printf '%s\n' "$dir" > "$(munge_user_file "$dir")"; fi
    ) 9>"$MUNGE_USERS/.lock"
}

munge_stop() {  # DIR: the cluster's folder
    local dir="$1"
    [ -d "$MUNGE_USERS" ] || return 0
    (
        flock 9
        rm -f "$(munge_user_file "$dir")"
        [ -f "$MUNGE_USERS/.started" ] || exit 0
        [ -z "$(find "$MUNGE_USERS" -mindepth 1 -maxdepth 1 ! -name '.*' -print -quit)" ] || exit 0  # still used
        if [ -f /run/munge/munged.pid ]; then
            local pid
            pid="$(cat /run/munge/munged.pid)"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$MUNGE_USERS/.started"
    ) 9>"$MUNGE_USERS/.lock"
}
