#!/bin/sh
# The image's entrypoint: runs `lethe ARGS`. A demo model baked into the image at build time (BUILD_DEMO_MODEL=1)
# is copied into the volume's model cache once, so the cache on the volume stays the one place models are found.
set -eu
if [ -d /opt/lethe-demo/demo-models ]; then
    mkdir -p "$LETHE_CACHE_DIR/demo-models"
    for model in /opt/lethe-demo/demo-models/*/; do
        target="$LETHE_CACHE_DIR/demo-models/$(basename "$model")"
        [ -e "$target" ] || { cp -a "$model" "$target.$$" && { mv -T "$target.$$" "$target" 2>/dev/null || rm -rf "$target.$$"; }; }
    done
fi
exec lethe "$@"
