#!/usr/bin/env bash
# Fuzz Hourglass's decoders with cargo-fuzz (libFuzzer).
#
#   scripts/fuzz.sh                 every target, 20 s each
#   scripts/fuzz.sh TARGET [SECONDS]
#   scripts/fuzz.sh all SECONDS
#
# Installs cargo-fuzz when missing. Uses the nightly toolchain when one is installed, otherwise
# the stable one with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags for the sanitizer). Fails on
# any crash, leak or timeout and prints the reproducer's path.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

target=${1:-all}
secs=${2:-20}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

tc=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    tc=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi

if [ "$target" = all ]; then
    mapfile -t targets < <(cargo "${tc[@]}" fuzz list)
else
    targets=("$target")
fi

failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    echo "fuzz: $t for ${secs}s"
    log=$(mktemp)
    if cargo "${tc[@]}" fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -dict=dict/json.dict \
        -print_final_stats=1 >"$log" 2>&1; then
        grep -E 'stat::number_of_executed_units|stat::average_exec_per_sec|cov: ' "$log" | tail -3 || true
        echo "fuzz: $t: no finding"
    else
        tail -40 "$log"
        echo "fuzz: $t FAILED; reproducer(s):"
        ls -1 "artifacts/$t" | sed "s|^|  fuzz/artifacts/$t/|"
        echo "  replay: cd fuzz && cargo ${tc[*]} fuzz run $t artifacts/$t/<file>"
        failed=1
    fi
    rm -f "$log"
done
exit $failed
