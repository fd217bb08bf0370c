#!/usr/bin/env bash
# Prints the README's table of measured guest time errors (Markdown), per operation x policy x
# host, from the `HOURGLASS-TIME-ERROR` lines that the `nested_vmm_*` tests print:
#
#   - on the nested kvm_amd (scripts/nested-kvm.sh nested_vmm_): the lines in the console logs
#     target/nested/console-{S,A,B}.log, each test's result taken from target/nested/results.tsv;
#     they are kept (with the result) in target/nested/time-errors.tsv, so that a later nested run
#     of other tests, which overwrites the consoles, does not lose them;
#   - on this machine's KVM (the normal suite, `cargo test -p hourglass-tests --test nested_vmm`):
#     the lines the tests append to $HOURGLASS_TIME_ERRORS (default target/time-errors.tsv); for
#     each operation, policy, host and vCPU count the latest line counts.
#
#   scripts/nested-table.sh [--console FILE]... [--tsv FILE]...   (defaults: the files above)
#
# Columns (all measured by the guest's own samples or by the test on the VMM's host; each cell is
# the worst over the vCPU counts listed, of largest magnitude):
#   pause              real time during which the VM was surely paused (of the cycles: the
#                      longest one)
#   pause seen         how much of the pause the guest saw, worst vCPU (for the cycles: worst
#                      cycle): its TSC advance between its last sample before the pause and one
#                      after, less the time the VM surely ran in between; `wallclock`: the pause;
#                      `frozen`: only the latency of the pause and resume API calls
#   largest TSC jump   the guest's largest forward TSC step between two of its samples over the
#                      run so far (under `frozen` this must stay small; under `wallclock` it is
#                      the pause, shown to the guest)
#   kvmclock - TSC     how far kvmclock moved from the TSC across the operation: Δkvmclock - ΔTSC
#                      between samples of the same vCPU before and after (or the guest's own worst
#                      disagreement between two consecutive samples, if larger)
#   cross-vCPU skew    the guest's worst cross-vCPU order violation (a TSC value read on one vCPU
#                      after another vCPU published a larger one); 0: none seen
#   behind wall clock  how far the operation put the guest's TSC behind the host's real time,
#                      (O_before - O_after) / f from the VM offsets the VMM read back, confirmed
#                      on every vCPU from the guest's samples (of the cycles: all together);
#                      `frozen`: the paused time, by design
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N="$ROOT/target/nested"
CONSOLES=()
TSVS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --console) CONSOLES+=("${2:?--console needs a file}"); shift 2 ;;
        --tsv) TSVS+=("${2:?--tsv needs a file}"); shift 2 ;;
        -h | --help) sed -n '/^set -euo/q;2,$p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "usage: scripts/nested-table.sh [--console FILE]... [--tsv FILE]..." >&2; exit 2 ;;
    esac
done
if [ ${#CONSOLES[@]} -eq 0 ]; then
    for f in "$N"/console-S.log "$N"/console-A.log "$N"/console-B.log; do
        [ -f "$f" ] && CONSOLES+=("$f")
    done
fi
if [ ${#TSVS[@]} -eq 0 ]; then
    f=${HOURGLASS_TIME_ERRORS:-$ROOT/target/time-errors.tsv}
    [ -f "$f" ] && TSVS+=("$f")
fi

python3 - "$N/results.tsv" "$N/time-errors.tsv" "${#CONSOLES[@]}" "${CONSOLES[@]}" "${TSVS[@]}" <<'EOF'
import os, re, sys

results_path, kept_path = sys.argv[1], sys.argv[2]
n_consoles = int(sys.argv[3])
consoles = sys.argv[4:4 + n_consoles]
tsvs = sys.argv[4 + n_consoles:]

INT_FIELDS = ("cpus", "cycles", "pause_ns", "max_tsc_jump_ns", "kvmclock_tsc_divergence_ns",
              "cross_vcpu_skew_ns", "wallclock_error_ns")


def parse(line, where):
    i = line.find("HOURGLASS-TIME-ERROR")
    if i < 0:
        return None
    rec = {}
    for tok in line[i:].split()[1:]:
        if "=" in tok:
            k, v = tok.split("=", 1)
            rec[k] = v
    try:
        for k in INT_FIELDS:
            rec[k] = int(rec[k])
        for k in ("op", "policy", "applied", "host"):
            rec[k]
    except (KeyError, ValueError) as e:
        sys.stderr.write(f"nested-table: {where}: malformed line ({e}): {line.strip()}\n")
        return None
    return rec


results = {}
if os.path.exists(results_path):
    for line in open(results_path, errors="replace"):
        f = line.rstrip("\n").split("\t")
        if len(f) >= 4:
            results[f[3]] = f[0]
failed = sorted(t for t, r in results.items() if t.startswith("nested_vmm_") and r != "ok")

records = []
kept = []
if os.path.exists(kept_path):
    kept = [l.rstrip("\n") for l in open(kept_path, errors="replace") if l.strip()]
    for n, line in enumerate(kept, 1):
        r = parse(line.replace("\t", " "), f"{kept_path}:{n}")
        if r:
            records.append(r)
new = []
for path in consoles:
    for n, line in enumerate(open(path, errors="replace"), 1):
        line = line.replace("\r", "").strip()
        r = parse(line, f"{path}:{n}")
        if r:
            r["result"] = results.get(r.get("test", ""), "?")
            records.append(r)
            line = line[line.find("HOURGLASS-TIME-ERROR"):]
            saved = "\t".join(line.split() + [f"result={r['result']}"])
            if saved not in kept and saved not in new:
                new.append(saved)
if new and os.path.isdir(os.path.dirname(kept_path)):
    with open(kept_path, "a") as f:
        f.write("".join(l + "\n" for l in new))
for path in tsvs:
    for n, line in enumerate(open(path, errors="replace"), 1):
        r = parse(line.replace("\t", " "), f"{path}:{n}")
        if r:
            # A line is written only once that operation's checks passed.
            r.setdefault("result", "ok")
            records.append(r)
if not records:
    sys.exit("nested-table: no HOURGLASS-TIME-ERROR lines found (run scripts/nested-kvm.sh "
             "nested_vmm_ and cargo test -p hourglass-tests --test nested_vmm first)")

# The latest line per operation, policy, host and vCPU count.
latest = {}
for r in records:
    latest[(r["op"], r["policy"], r["host"], r["cpus"])] = r

OPS = {"pause-resume-cycles": "pause/resume ×{cycles}", "pause-2s": "pause 2 s"}


def fmt(ns):
    a = abs(ns)
    sign = "-" if ns < 0 else ""
    if a == 0:
        return "0"
    if a < 1_000:
        return f"{sign}{a} ns"
    if a < 1_000_000:
        return f"{sign}{a / 1e3:.1f} µs"
    if a < 1_000_000_000:
        return f"{sign}{a / 1e6:.1f} ms"
    return f"{sign}{a / 1e9:.3f} s"


def worst(rows, k):
    return max((r[k] for r in rows), key=abs)


def seen(rows):
    v = [int(r["pause_seen_ns"]) for r in rows if "pause_seen_ns" in r]
    return fmt(max(v, key=abs)) if v else "—"


groups = {}
for key, r in latest.items():
    groups.setdefault(key[:3], []).append(r)

host_order = lambda h: (0 if h.startswith("kvm") else 1, h)
op_order = lambda o: list(OPS).index(o) if o in OPS else len(OPS)
pol_order = lambda p: {"wallclock": 0, "frozen": 1}.get(p, 2)

print("| operation | policy requested → applied | host | vCPUs | pause | pause seen by the guest "
      "| largest TSC jump seen by the guest | kvmclock − TSC | cross-vCPU skew "
      "| guest behind wall clock | tests |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for (op, pol, host) in sorted(groups, key=lambda k: (op_order(k[0]), pol_order(k[1]),
                                                      host_order(k[2]))):
    rows = sorted(groups[(op, pol, host)], key=lambda r: r["cpus"])
    applied = "/".join(sorted({r["applied"] for r in rows}))
    cycles = max(r["cycles"] for r in rows)
    res = sorted({r["result"] for r in rows})
    print(f"| {OPS.get(op, op).format(cycles=cycles)} | {pol} → {applied} | {host} | "
          f"{', '.join(str(r['cpus']) for r in rows)} | {fmt(worst(rows, 'pause_ns'))} | "
          f"{seen(rows)} | "
          f"{fmt(worst(rows, 'max_tsc_jump_ns'))} | "
          f"{fmt(worst(rows, 'kvmclock_tsc_divergence_ns'))} | "
          f"{fmt(worst(rows, 'cross_vcpu_skew_ns'))} | {fmt(worst(rows, 'wallclock_error_ns'))} | "
          f"{', '.join(res)} |")
if failed:
    print()
    print(f"Failed in the last nested run (scripts/nested-kvm.sh; see target/nested/results.tsv): "
          f"{', '.join(failed)}.")
EOF
