# Shared set-up of the benchmarks that run real `hourglass` processes (sourced, not run):
# the binaries, the /dev/kvm check, a scratch directory whose VMMs are killed on exit, and
# small helpers. The sourcing script sets `profile` and `bench` (its name, for messages) first;
# `tmp` is made under TMP_BASE if the script set one.
if [ -n "${BIN_DIR:-}" ]; then
    dir=$BIN_DIR
else
    cargo build -q --profile "$profile" -p vmm --bins
    dir=${CARGO_TARGET_DIR:-target}/$([ "$profile" = dev ] && echo debug || echo "$profile")
fi
hg="$dir/hourglass"
chr="$dir/ch-remote"

[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "SKIPPED $bench: /dev/kvm is not usable"; exit 0; }

if [ -n "${TMP_BASE:-}" ]; then
    mkdir -p "$TMP_BASE"
    tmp=$(mktemp -d "$TMP_BASE/$bench.XXXXXX")
    tmp=$(cd "$tmp" && pwd)
else
    tmp=$(mktemp -d)
fi
pids=() # VMMs to kill on exit
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT

wait_for() { # path what: wait for a Unix socket to appear
    for _ in $(seq 1 2000); do [ -S "$1" ] && return 0; sleep 0.01; done
    echo "timed out waiting for $2" >&2
    exit 1
}

median() { # values... -> their median
    python3 -c 'import statistics,sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.1f}")' "$@"
}
