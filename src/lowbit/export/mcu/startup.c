/* Minimal Cortex-M startup for lowbit's QEMU MPS2 targets (issue 18).
   Vector table at the start of FLASH (placed by the linker script, section .vectors); the reset handler
   enables the FPU in CPACR before any float code (without it the first VFP instruction faults),
   copies .data from its load address in FLASH to RAM, then enters newlib's rdimon crt0 (_start), which
   zeroes .bss, sets up the heap/stack through semihosting and calls main. A fault prints one line
   through semihosting and makes QEMU exit with status 1 (it would hang otherwise). SysTick counts
   processor clocks; its interrupt counts wraps (lb_systick_wraps). */
#include <stdint.h>

extern uint32_t __stack_top__, __data_load__, __data_start__, __data_end__;
extern void _start(void);
volatile uint32_t lb_systick_wraps;

static void semihost(uint32_t op, const void *arg)
{
    register uint32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
}

void Reset_Handler(void)
{
#if defined(__ARM_FP)
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20; /* CPACR: CP10, CP11 full access */
    __asm__ volatile("dsb\n\tisb");
#endif
    {
        uint32_t *s = &__data_load__, *d = &__data_start__;
        while (d < &__data_end__) *d++ = *s++;
    }
    _start();
    for (;;) {}
}

void Fault_Handler(void)
{
    semihost(0x04u, "lowbit: Cortex-M fault (HardFault/MemManage/BusFault/UsageFault)\n"); /* SYS_WRITE0 */
    semihost(0x18u, (const void *)0x20023u); /* SYS_EXIT, ADP_Stopped_RunTimeErrorUnknown -> exit 1 */
    for (;;) {}
}

void SysTick_Handler(void) { lb_systick_wraps++; }

__attribute__((section(".vectors"), used)) static void (*const lb_vectors[16])(void) = {
    (void (*)(void))&__stack_top__, Reset_Handler, Fault_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler, Fault_Handler, 0, 0, 0, 0, Fault_Handler, Fault_Handler, 0, Fault_Handler, SysTick_Handler,
};

/* SysTick (processor clock, 24-bit down counter): lb_cycles() is monotonic while it runs */
#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)

void lb_systick_start(void)
{
    SYST_CSR = 0;
    SYST_RVR = 0x00FFFFFFu;
    SYST_CVR = 0;
    lb_systick_wraps = 0;
    SYST_CSR = 7u; /* enable, interrupt on wrap, processor clock */
    while (SYST_CVR == 0u) {} /* the first clock loads RVR */
}

uint64_t lb_cycles(void)
{
    uint32_t w, v;
    do {
        w = lb_systick_wraps;
        v = SYST_CVR;
    } while (w != lb_systick_wraps);
    return (uint64_t)w * 0x01000000u + (0x00FFFFFFu - v);
}
