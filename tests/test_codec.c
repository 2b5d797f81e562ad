/* SPDX-License-Identifier: MIT */
/*
 * Packet bodies: the little-endian put/get helpers of cport.h (byte order,
 * unaligned addresses, signed and float values) and the bounded writer and
 * reader (exact fits, sticky errors, nothing written or read out of bounds),
 * together with a packet built in place. No sockets: runs once.
 */
#include "helpers.h"

#include <stdint.h>
#include <string.h>

Test(codec, put_writes_little_endian_bytes_at_any_address, .timeout = 10)
{
    uint8_t buf[32];
    for (size_t off = 0; off < 8; off++) { /* every alignment */
        uint8_t *p = buf + off;
        memset(buf, 0xAA, sizeof buf);
        cp_put_u16(p, 0x1122);
        cr_assert(p[0] == 0x22 && p[1] == 0x11 && p[2] == 0xAA, "u16 at +%zu", off);
        cp_put_u32(p, 0x11223344u);
        cr_assert_eq(memcmp(p, "\x44\x33\x22\x11\xAA", 5), 0, "u32 at +%zu", off);
        cp_put_u64(p, 0x1122334455667788ull);
        cr_assert_eq(memcmp(p, "\x88\x77\x66\x55\x44\x33\x22\x11\xAA", 9), 0, "u64 at +%zu", off);
        cp_put_i32(p, -2);
        cr_assert_eq(memcmp(p, "\xFE\xFF\xFF\xFF", 4), 0, "i32 at +%zu", off);
        cp_put_f32(p, 1.0f);
        cr_assert_eq(memcmp(p, "\x00\x00\x80\x3F", 4), 0, "f32 at +%zu", off);
        cp_put_u8(p, 0x7F);
        cr_assert_eq(p[0], 0x7F);
    }
}

Test(codec, get_reads_little_endian_bytes_at_any_address, .timeout = 10)
{
    uint8_t buf[32];
    for (size_t off = 0; off < 8; off++) {
        uint8_t *p = buf + off;
        memcpy(p, "\x88\x77\x66\x55\x44\x33\x22\x11", 8);
        cr_assert_eq(cp_get_u8(p), 0x88);
        cr_assert_eq(cp_get_u16(p), 0x7788);
        cr_assert_eq(cp_get_u32(p), 0x55667788u);
        cr_assert(cp_get_u64(p) == 0x1122334455667788ull, "u64 at +%zu", off);
        memcpy(p, "\x00\x00\x00\x80", 4);
        cr_assert_eq(cp_get_i32(p), INT32_MIN);
        memcpy(p, "\x00\x00\x20\xC1", 4);
        cr_assert(cp_get_f32(p) == -10.0f, "f32 at +%zu", off);
    }
}

Test(codec, round_trips_of_extreme_values, .timeout = 10)
{
    uint8_t p[8];
    const uint64_t u64s[] = { 0, 1, 0xFFFFFFFFFFFFFFFFull, 0x8000000000000000ull, 0x0102030405060708ull };
    for (size_t i = 0; i < sizeof u64s / sizeof u64s[0]; i++) {
        cp_put_u64(p, u64s[i]);
        cr_assert(cp_get_u64(p) == u64s[i]);
        cp_put_u32(p, (uint32_t)u64s[i]);
        cr_assert_eq(cp_get_u32(p), (uint32_t)u64s[i]);
        cp_put_u16(p, (uint16_t)u64s[i]);
        cr_assert_eq(cp_get_u16(p), (uint16_t)u64s[i]);
    }
    const int32_t i32s[] = { 0, -1, 1, INT32_MIN, INT32_MAX };
    for (size_t i = 0; i < sizeof i32s / sizeof i32s[0]; i++) {
        cp_put_i32(p, i32s[i]);
        cr_assert_eq(cp_get_i32(p), i32s[i]);
    }
    const float f32s[] = { 0.0f, -0.0f, 3.5f, -1e30f, 1e-38f };
    for (size_t i = 0; i < sizeof f32s / sizeof f32s[0]; i++) {
        cp_put_f32(p, f32s[i]);
        float back = cp_get_f32(p);
        cr_assert_eq(memcmp(&back, &f32s[i], 4), 0, "f32 %g changed", (double)f32s[i]);
    }
}

/* A writer fills its buffer exactly; the first field that does not fit sets
 * err and writes nothing, and so does every later one, even a field small
 * enough for the room left. */
Test(codec, writer_stops_at_its_end_and_the_error_sticks, .timeout = 10)
{
    uint8_t buf[16];
    memset(buf, 0xAA, sizeof buf);
    cp_writer w = cp_writer_make(buf, 11);
    cp_write_u8(&w, 1);
    cp_write_u16(&w, 0x0302);
    cp_write_u32(&w, 0x07060504u);
    cr_assert_eq(cp_writer_len(&w), 7);
    cr_assert_eq(w.err, 0);
    cp_write_u64(&w, 0); /* 8 bytes, 4 left */
    cr_assert_eq(w.err, 1);
    cr_assert_eq(cp_writer_len(&w), 7, "a failed write moved the cursor");
    cp_write_u8(&w, 0xEE); /* would fit, but the writer has failed */
    cp_write_bytes(&w, "x", 1);
    cr_assert_eq(cp_writer_len(&w), 7);
    cr_assert_eq(memcmp(buf, "\x01\x02\x03\x04\x05\x06\x07\xAA\xAA\xAA\xAA\xAA", 12), 0,
                 "bytes were written after the error or beyond the end");

    w = cp_writer_make(buf, 8);
    cp_write_i32(&w, -1);
    cp_write_f32(&w, 2.0f);
    cr_assert(w.err == 0 && cp_writer_len(&w) == 8, "an exact fit is not an error");
    cp_write_bytes(&w, NULL, 0);
    cr_assert_eq(w.err, 0, "writing nothing at the end fits");

    w = cp_writer_make(NULL, 0);
    cp_write_u8(&w, 1);
    cr_assert(w.err == 1 && cp_writer_len(&w) == 0);
}

/* A reader yields the fields in order; a short body sets err, yields 0 and
 * leaves out-parameters alone, and the error sticks. */
Test(codec, reader_stops_at_its_end_and_the_error_sticks, .timeout = 10)
{
    const uint8_t body[] = { 1, 2, 3, 4, 5, 6, 7, 'h', 'i' };
    cp_reader r = cp_reader_make(body, sizeof body);
    cr_assert_eq(cp_read_u8(&r), 1);
    cr_assert_eq(cp_read_u16(&r), 0x0302);
    cr_assert_eq(cp_read_u32(&r), 0x07060504u);
    char two[2];
    cp_read_bytes(&r, two, 2);
    cr_assert(two[0] == 'h' && two[1] == 'i' && r.err == 0);
    cr_assert_eq(cp_reader_left(&r), 0);

    r = cp_reader_make(body, 5);
    cr_assert_eq(cp_read_u32(&r), 0x04030201u);
    cr_assert_eq(cp_read_u16(&r), 0, "a short read yields 0");
    cr_assert_eq(r.err, 1);
    cr_assert_eq(cp_reader_left(&r), 1, "a failed read moved the cursor");
    cr_assert_eq(cp_read_u8(&r), 0, "would fit, but the reader has failed");
    two[0] = 'z';
    cp_read_bytes(&r, two, 1);
    cr_assert_eq(two[0], 'z', "a failed read wrote its output");
    cr_assert(cp_read_u64(&r) == 0 && cp_read_i32(&r) == 0 && cp_read_f32(&r) == 0.0f);

    r = cp_reader_make(NULL, 0);
    cr_assert_eq(cp_reader_left(&r), 0);
    cr_assert(cp_read_u8(&r) == 0 && r.err == 1);
}

/* The intended use: a packet reserved, its fields written with a writer, the
 * header filled from the writer's length; a reader parses the body back. */
Test(codec, packet_built_with_a_writer_parses_back, .timeout = 10)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    cp_sendbuf *b = cp_packet_open(42, 64);
    cr_assert_not_null(b);
    cp_writer w = cp_writer_make(cp_packet_body(b), 64);
    cp_write_u64(&w, 0xDEADBEEFCAFEF00Dull);
    cp_write_i32(&w, -123456);
    cp_write_f32(&w, 0.25f);
    cp_write_u16(&w, 5);
    cp_write_bytes(&w, "hello", 5);
    cr_assert_eq(w.err, 0);
    cr_assert_eq(cp_packet_close(b, cp_writer_len(&w)), 0);

    const uint8_t *d = cp_sendbuf_data(b);
    cr_assert_eq(cp_sendbuf_len(b), 4 + 8 + 4 + 4 + 2 + 5);
    cr_assert_eq(cp_get_u16(d), cp_sendbuf_len(b));
    cr_assert_eq(cp_get_u16(d + 2), 42);
    cp_reader r = cp_reader_make(d + CP_PACKET_HEADER, cp_get_u16(d) - CP_PACKET_HEADER);
    cr_assert(cp_read_u64(&r) == 0xDEADBEEFCAFEF00Dull);
    cr_assert_eq(cp_read_i32(&r), -123456);
    cr_assert(cp_read_f32(&r) == 0.25f);
    uint16_t n = cp_read_u16(&r);
    char name[8] = { 0 };
    cp_read_bytes(&r, name, n);
    cr_assert_str_eq(name, "hello");
    cr_assert(r.err == 0 && cp_reader_left(&r) == 0);
    cp_sendbuf_unref(b);
    cpt_leak_end(&leak);
}
