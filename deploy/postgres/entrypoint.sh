#!/bin/sh
# PostgreSQL for the compose stack: on first start, a cluster in the volume whose superuser is $POSTGRES_USER with
# $POSTGRES_PASSWORD (scram-sha-256 over the network) and one database, $POSTGRES_DB; then the server, in front.
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (deploy/lethe.env)}"
POSTGRES_USER="${POSTGRES_USER:-lethe}"
POSTGRES_DB="${POSTGRES_DB:-lethe}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password_file="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password_file"
    initdb --username="$POSTGRES_USER" --pwfile="$password_file" --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$password_file"
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "CREATE DATABASE \"$POSTGRES_DB\";" | postgres --single -D "$PGDATA" postgres >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/run/postgresql
