/* Minimal Cortex-M startup for lowbit's QEMU targets (issue 18).
   Vector table at the start of FLASH (placed by the linker script, section .vectors); the reset handler
   enables the FPU in CPACR before any float code (without it the first VFP instruction faults),
   copies .data from its load address in FLASH to RAM, zeroes .bss, calls main and ends the run through
   semihosting (SYS_EXIT: QEMU exits with status 0 if main returned 0, else 1). No C runtime start-up, stdio or
   heap (the program links without newlib's crt0: -nostartfiles, nosys.specs), so that a part with 16 KiB of
   RAM holds a model beside it. A fault prints one line through semihosting and makes QEMU exit with status 1
   (it would hang otherwise). SysTick counts processor clocks; its interrupt counts wraps (lb_systick_wraps).
   lb_out_* write one line of text through semihosting (SYS_WRITE to the host's standard output). */
#include <stdint.h>

extern uint32_t __stack_top__, __data_load__, __data_start__, __data_end__, __bss_start__, __bss_end__;
int main(void);
volatile uint32_t lb_systick_wraps;

static uint32_t semihost(uint32_t op, const void *arg)
{
    register uint32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
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
        for (d = &__bss_start__; d < &__bss_end__; d++) *d = 0;
    }
    /* SYS_EXIT: ADP_Stopped_ApplicationExit -> exit 0, ADP_Stopped_RunTimeErrorUnknown -> exit 1 */
    semihost(0x18u, (const void *)(main() == 0 ? 0x20026u : 0x20023u));
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

/* one line of output, written when it ends (or fills the buffer) */
static char lb_line[128];
static uint32_t lb_len;

static void lb_flush(void)
{
    static uint32_t out = 0xFFFFFFFFu;
    uint32_t args[3];
    if (out == 0xFFFFFFFFu) { /* the host's standard output: SYS_OPEN(":tt", "w") */
        args[0] = (uint32_t)(uintptr_t)":tt";
        args[1] = 4u;
        args[2] = 3u;
        out = semihost(0x01u, args);
    }
    args[0] = out;
    args[1] = (uint32_t)(uintptr_t)lb_line;
    args[2] = lb_len;
    semihost(0x05u, args); /* SYS_WRITE */
    lb_len = 0;
}

void lb_out_s(const char *s)
{
    while (*s) {
        if (lb_len == sizeof lb_line) lb_flush();
        lb_line[lb_len++] = *s++;
    }
}

void lb_out_u(uint32_t v) /* decimal */
{
    char s[11];
    int i = 10;
    s[10] = 0;
    do s[--i] = (char)('0' + v % 10u); while ((v /= 10u) != 0u);
    lb_out_s(s + i);
}

void lb_out_x(uint32_t v) /* 8 hex digits */
{
    char s[9];
    int i;
    for (i = 7; i >= 0; i--, v >>= 4) s[i] = "0123456789abcdef"[v & 15u];
    s[8] = 0;
    lb_out_s(s);
}

void lb_out_end(void)
{
    lb_out_s("\n");
    lb_flush();
}
