/* Session timeouts: idle and partial-packet, firing and not firing. */
#include "helpers.h"

#include <string.h>

static void start_env(cpt_env *e, uint32_t idle_ms, uint32_t packet_ms)
{
    cp_server_opts o = {.host = CPT_HOST4};
    o.session.idle_timeout_ms = idle_ms;
    o.session.packet_timeout_ms = packet_ms;
    cpt_env_start(e, 0, &o, NULL, 64, 0);
}

Test(timeouts, half_a_packet_then_silence_is_cut_by_the_packet_timeout, .timeout = 30)
{
    cpt_env e;
    start_env(&e, 0, 200);
    int fd = cpt_xconnect(e.sport);
    uint8_t hdr[6];
    cpt_put_header(hdr, 40, 7); /* promises 40 bytes, sends 6 */
    hdr[4] = hdr[5] = 0xAA;
    uint64_t t0 = cpt_now_ms();
    cpt_xsend(fd, hdr, sizeof hdr);
    cpt_xclosed(fd, 3000);
    uint64_t took = cpt_now_ms() - t0;
    cr_expect_geq(took, 180, "cut after %llu ms, before the 200 ms timeout", (unsigned long long)took);
    cr_expect_lt(took, 1500, "cut only after %llu ms", (unsigned long long)took);
    cpt_close(fd);
    /* The client can see the close before on_disconnected has run. */
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 2000, "on_disconnected did not run");
    cpt_xsettle(e.svc, e.t);
    cr_expect_eq(atomic_load(&e.t->reasons[CP_REASON_PACKET_TIMEOUT]), 1);
    cpt_env_xneighbour(&e);
    cpt_env_stop(&e);
}

Test(timeouts, an_idle_client_is_cut_by_the_idle_timeout, .timeout = 30)
{
    cpt_env e;
    start_env(&e, 200, 0);
    int fd = cpt_xconnect(e.sport);
    uint64_t t0 = cpt_now_ms();
    cpt_xclosed(fd, 3000);
    uint64_t took = cpt_now_ms() - t0;
    cr_expect_geq(took, 180, "cut after %llu ms", (unsigned long long)took);
    cr_expect_lt(took, 1500, "cut only after %llu ms", (unsigned long long)took);
    cpt_close(fd);
    /* The client can see the close before on_disconnected has run. */
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 2000, "on_disconnected did not run");
    cpt_xsettle(e.svc, e.t);
    cr_expect_eq(atomic_load(&e.t->reasons[CP_REASON_IDLE_TIMEOUT]), 1);
    cpt_env_stop(&e);
}

Test(timeouts, an_active_client_is_never_cut, .timeout = 30)
{
    cpt_env e;
    /* Timeouts ten times the gaps below: this machine's scheduler can stall a
     * thread for 150 ms, and a stall is not what this test is about. */
    start_env(&e, 500, 500);
    int fd = cpt_xconnect(e.sport);
    uint8_t body[32];
    cpt_fill(body, sizeof body, 0, 3);
    /* 1 s of traffic every 50 ms, each packet sent in two halves 20 ms apart:
     * the partial-packet clock restarts with every packet and never runs out,
     * though the whole test lasts twice the timeouts. */
    for (int i = 0; i < 20; i++) {
        uint8_t pkt[36];
        cpt_put_header(pkt, sizeof pkt, 1);
        memcpy(pkt + 4, body, sizeof body);
        cpt_xsend(fd, pkt, 10);
        cpt_sleep_ms(20);
        cpt_xsend(fd, pkt + 10, sizeof pkt - 10);
        cpt_xrecv_packet_eq(fd, 1, body, sizeof body);
        cpt_sleep_ms(30);
    }
    cr_expect_eq(cpt_peek_state(fd), 0, "the active client was disconnected");
    cpt_close(fd);
    cpt_xsettle(e.svc, e.t);
    cr_expect_eq(atomic_load(&e.t->reasons[CP_REASON_IDLE_TIMEOUT]), 0);
    cr_expect_eq(atomic_load(&e.t->reasons[CP_REASON_PACKET_TIMEOUT]), 0);
    cpt_env_stop(&e);
}

Test(timeouts, timeouts_off_keep_an_idle_client, .timeout = 30)
{
    cpt_env e;
    start_env(&e, 0, 0);
    int fd = cpt_xconnect(e.sport);
    cpt_sleep_ms(400);
    cr_expect_eq(cpt_peek_state(fd), 0);
    cpt_close(fd);
    cpt_env_stop(&e);
}
