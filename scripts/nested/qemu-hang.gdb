# Reads a hung emulated host's CPU 0 out of QEMU (issue 18): why a pending interrupt is not
# taken. Needs a QEMU built with debug info (field names as in QEMU 7.2); run by
# scripts/nested-kvm.sh when NESTED_GDB_SCRIPT names this file:
#   NESTED_QEMU=/path/to/qemu-system-x86_64 NESTED_GDB_SCRIPT=scripts/nested/qemu-hang.gdb \
#       scripts/nested-kvm.sh nested_linux_
# Bits to read it by (target/i386/cpu.h): hflags2 GIF=0x1 HIF=0x2 NMI=0x4 VINTR=0x8 NPT=0x40
# VGIF=0x100; hflags INHIBIT_IRQ=0x8 GUEST=0x200000; eflags IF=0x200; interrupt_request
# HARD=0x2 EXITTB=0x4 POLL=0x10 HALT=0x20 SMI=0x40 DEBUG=0x80 VIRQ=0x100 NMI=0x200
# INIT=0x400 SIPI=0x800 MCE=0x1000 TPR=0x2000 (include/exec/cpu-all.h, target/i386/cpu.h).
set pagination off
set confirm off
set $cpu = (X86CPU *) cpus.tqh_first
set $apic = (APICCommonState *) $cpu->apic_state

define cpustate
  printf "  interrupt_request=%#x exit_request=%d halted=%d exception_index=%d cflags_next_tb=%#x icount_high=%d\n", $cpu->parent_obj.interrupt_request, $cpu->parent_obj.exit_request, $cpu->parent_obj.halted, $cpu->parent_obj.exception_index, $cpu->parent_obj.cflags_next_tb, $cpu->neg.icount_decr.u16.high
  printf "  eip=%#lx cs.base=%#lx eflags=%#x hflags=%#x hflags2=%#x int_ctl=%#x intercept=%#lx vm_vmcb=%#lx\n", $cpu->env.eip, $cpu->env.segs[1].base, $cpu->env.eflags, $cpu->env.hflags, $cpu->env.hflags2, $cpu->env.int_ctl, $cpu->env.intercept, $cpu->env.vm_vmcb
  printf "  apic: tpr=%#x spurious_vec=%#x irr[7]=%#x isr[7]=%#x lvt_timer=%#x initial_count=%u\n", $apic->tpr, $apic->spurious_vec, $apic->irr[7], $apic->isr[7], $apic->lvt[0], $apic->initial_count
end

echo == at attach (the vCPU thread stopped wherever it was)\n
cpustate
info threads

# Where the vCPU thread goes next, a few times: does it still reach the interrupt check, and
# with what? (A breakpoint that is never hit leaves gdb waiting: the caller's timeout ends it.)
set $k = 0
while $k < 4
  tbreak helper_pause
  continue
  printf "== at helper_pause (%d)\n", $k
  cpustate
  set $k = $k + 1
end
set $k = 0
while $k < 4
  tbreak x86_cpu_exec_interrupt
  continue
  printf "== at x86_cpu_exec_interrupt (%d): its interrupt_request argument %#x\n", $k, interrupt_request
  cpustate
  bt 8
  set $k = $k + 1
end
detach
