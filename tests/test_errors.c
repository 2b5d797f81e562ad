/* SPDX-License-Identifier: MIT */
/*
 * The error table: every errno constant the library's sources can return has
 * a name (cp_err_name) and a text (cp_strerror). The list of codes is not
 * written here: tests/errcodes.cmake scans src/ and include/cport.h at build
 * time, so a code added to the sources is checked by this test at once.
 * No sockets: runs once.
 */
#include "helpers.h"

#include "sys.h" /* the library's definitions of the codes Windows lacks */

#include <limits.h>
#include <string.h>

typedef struct errcode {
    int code;
    const char *name;
    const char *file;
} errcode;

#define CPT_ERRCODE(name, file) { name, #name, file },
static const errcode returned[] = {
#include "errcodes.inc"
};
#undef CPT_ERRCODE

enum { NRETURNED = sizeof returned / sizeof returned[0] };

/* The scan itself works: it finds the codes the sources plainly return. A
 * broken scan giving an empty list would make the next test pass for nothing. */
Test(errors, scan_finds_the_codes_in_the_sources, .timeout = 10)
{
    cr_assert_geq(NRETURNED, 20, "the scan found only %d codes", (int)NRETURNED);
    const char *must[] = { "EINVAL", "ENOTCONN", "EALREADY", "ESHUTDOWN", "EPROTO" };
    for (size_t i = 0; i < sizeof must / sizeof must[0]; i++) {
        bool found = false;
        for (int k = 0; k < NRETURNED; k++)
            found = found || strcmp(returned[k].name, must[i]) == 0;
        cr_assert(found, "the scan missed %s", must[i]);
    }
}

/* True if the scan found another name with the same value that is the one
 * the library gives (EOPNOTSUPP is ENOTSUP on Linux). */
static bool is_alias_of_returned(int code, const char *name)
{
    for (int k = 0; k < NRETURNED; k++)
        if (returned[k].code == code && strcmp(returned[k].name, name) == 0)
            return true;
    return false;
}

Test(errors, every_returned_code_has_a_name_and_a_text, .timeout = 10)
{
    for (int k = 0; k < NRETURNED; k++) {
        const errcode *e = &returned[k];
        const char *name = cp_err_name(-e->code);
        const char *text = cp_strerror(-e->code);
        cr_expect(strcmp(text, "unknown error") != 0, "-%s (%s) has no text in the error table (src/core.c)",
                  e->name, e->file);
        cr_expect(strcmp(name, e->name) == 0 || is_alias_of_returned(e->code, name),
                  "-%s (%s) is named \"%s\"", e->name, e->file, name);
    }
}

Test(errors, names_and_texts_of_known_codes, .timeout = 10)
{
    cr_assert_str_eq(cp_err_name(-EALREADY), "EALREADY");
    cr_assert_str_eq(cp_err_name(-ECONNREFUSED), "ECONNREFUSED");
    cr_assert_str_eq(cp_err_name(-ESHUTDOWN), "ESHUTDOWN");
    cr_assert_str_eq(cp_err_name(-ENOTSUP), "ENOTSUP", "the library's name wins over an alias");
    cr_assert_str_eq(cp_strerror(-ECONNREFUSED), "connection refused");
    cr_assert_str_eq(cp_strerror(-EAGAIN), "resource temporarily unavailable, try again");
    cr_assert_str_eq(cp_err_name(0), "OK");
    cr_assert_str_eq(cp_err_name(7), "OK", "non-negative results are not errors");
    cr_assert_str_eq(cp_strerror(0), "success");
}

Test(errors, unknown_codes_get_stable_texts, .timeout = 10)
{
    const int unknown[] = { -99999, -1000000, INT_MIN };
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        cr_assert_str_eq(cp_err_name(unknown[i]), "UNKNOWN", "code %d", unknown[i]);
        cr_assert_str_eq(cp_strerror(unknown[i]), "unknown error", "code %d", unknown[i]);
    }
}

/* One table: over every small negative value (and Winsock's range, where
 * ESHUTDOWN lives on Windows), a code has a name exactly when it has a text,
 * and no two values share a name or a text (a copy-paste slip in the table). */
Test(errors, one_table_names_and_texts_agree, .timeout = 10)
{
    enum { MAXN = 256 };
    const char *names[MAXN], *texts[MAXN];
    int values[MAXN], n = 0;
    for (int v = 1; v < 12000; v++) {
        if (v == 1000)
            v = 10000; /* skip to Winsock's codes */
        const char *name = cp_err_name(-v), *text = cp_strerror(-v);
        bool named = strcmp(name, "UNKNOWN") != 0, described = strcmp(text, "unknown error") != 0;
        cr_assert_eq(named, described, "code -%d: name \"%s\", text \"%s\"", v, name, text);
        if (!named)
            continue;
        cr_assert_eq(name[0], 'E', "code -%d named \"%s\"", v, name);
        for (int k = 0; k < n; k++) {
            cr_assert_str_neq(name, names[k], "codes -%d and -%d share a name", v, values[k]);
            cr_assert_str_neq(text, texts[k], "codes -%d and -%d share a text", v, values[k]);
        }
        cr_assert_lt(n, MAXN);
        names[n] = name;
        texts[n] = text;
        values[n++] = v;
    }
}
