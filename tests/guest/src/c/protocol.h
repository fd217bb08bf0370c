/* Hourglass test guest <-> time-probe device protocol.
 * Every value here is mirrored by a Rust constant in tests/guest/src/lib.rs;
 * a unit test there parses this file and checks that both sides agree. */
#ifndef HOURGLASS_PROTOCOL_H
#define HOURGLASS_PROTOCOL_H

/* Port-I/O registers, all 32 bits wide, at PROBE_BASE + offset. */
#define PROBE_BASE 0x5a0
#define PROBE_PORT_COUNT 0x1c
#define PROBE_REG_ID 0x0        /* read: PROBE_MAGIC */
#define PROBE_REG_VCPUS 0x4     /* read: number of vCPUs */
#define PROBE_REG_DIRTY_MIB 0x8 /* read: MiB to dirty (0 = none) */
#define PROBE_REG_TSC_KHZ 0xc   /* read: guest TSC kHz (0 = unknown) */
#define PROBE_REG_DOORBELL 0x10 /* write: guest-physical address of a record */
#define PROBE_REG_IDLE_US 0x14  /* read: idle mode, microseconds halted between samples (0 = busy loop) */
#define PROBE_REG_DIRTY_PASSES 0x18 /* read: passes vCPU 0 makes over the dirtied MiB (0 = forever) */
#define PROBE_MAGIC 0x31504748  /* "HGP1" little endian */

/* Record a vCPU writes into its memory before ringing the doorbell.
 * RECORD_WORDS little-endian u64 words; word indexes below. */
#define RECORD_MAGIC 0x4847524543303031ULL /* "HGREC001" */
#define RECORD_WORDS 23
#define REC_MAGIC 0
#define REC_VCPU 1
#define REC_SEQ 2
#define REC_SAMPLES 3
#define REC_LAST_TSC 4
#define REC_LAST_KVMCLOCK_NS 5
#define REC_LAST_TSC_ADJUST 6
#define REC_TSC_BACKWARDS 7
#define REC_TSC_BACKWARDS_WORST 8
#define REC_CROSS_VCPU 9
#define REC_CROSS_VCPU_WORST 10
#define REC_KVMCLOCK_MISMATCH 11
#define REC_KVMCLOCK_MISMATCH_WORST_NS 12
#define REC_MAX_JUMP_NS 13
#define REC_FLAGS 14
#define REC_TSC_KHZ 15
#define REC_DIRTY_PASSES 16
#define REC_ADJUST_WRITES 17
#define REC_TSC_BIAS 18
/* Written by the device into guest memory while handling the doorbell. */
#define REC_CMD 19
#define REC_CMD_ARG 20
#define REC_CMD_SEQ 21
#define REC_SIM_SKEW 22         /* cycles subtracted from every TSC read (CMD_SIMULATE_SKEW) */

/* REC_FLAGS bits. */
#define FLAG_KVMCLOCK 0x1       /* kvmclock is enabled and read */
#define FLAG_TSC_ADJUST 0x2     /* CPUID says IA32_TSC_ADJUST exists */
#define FLAG_KHZ_CPUID 0x4      /* tsc_khz came from CPUID 0x40000010 */
#define FLAG_KHZ_PROBE 0x8      /* tsc_khz came from the probe */
#define FLAG_KHZ_PVCLOCK 0x10   /* tsc_khz derived from pvclock mul/shift */
#define FLAG_ADJUST_MOVES_TSC 0x20 /* a guest TSC_ADJUST write moved the TSC */
#define FLAG_HALTING 0x40       /* the vCPU halts after this report */

/* Commands (REC_CMD). */
#define CMD_NONE 0
#define CMD_SET_TSC_ADJUST 1    /* WRMSR IA32_TSC_ADJUST := REC_CMD_ARG */
#define CMD_HALT 2              /* stop sampling, report once more, cli; hlt */
#define CMD_SIMULATE_SKEW 3     /* self-test: subtract REC_CMD_ARG from every later TSC read */

/* Guest behaviour. */
#define MAX_VCPUS 32
#define DIRTY_BASE 0x400000     /* the dirtied region starts at 4 MiB */
#define REPORT_INTERVAL_US 5000 /* one doorbell per vCPU every 5 ms */
#define IDLE_MAX_US 1000000     /* longer idle periods are clamped to this */
#define KVMCLOCK_BOUND_NS 1000  /* kvmclock/TSC disagreement bound */
#define GUEST_LOAD_ADDR 0x100000

#endif
