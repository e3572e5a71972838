/* Just enough JSON for mtevm's guest agent (docs/agent-protocol.md).
 *
 * Host -> guest messages are flat objects whose values are strings, numbers, booleans, null or
 * arrays of strings; that is all this reader understands (anything else is skipped). Writing is
 * a growable buffer with an escaper. No library: the agent is a static aarch64 binary built with
 * only libc6-dev-arm64-cross, and this is ~150 lines. */
#ifndef MTEVM_JSON_H
#define MTEVM_JSON_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a growable byte buffer ---- */
struct buf {
	char *p;
	size_t len, cap;
};

static void buf_reserve(struct buf *b, size_t extra)
{
	if (b->len + extra + 1 <= b->cap)
		return;
	size_t cap = b->cap ? b->cap : 4096;
	while (cap < b->len + extra + 1)
		cap *= 2;
	char *p = realloc(b->p, cap);
	if (!p) {
		fprintf(stderr, "mtevm-agent: out of memory\n");
		exit(1);
	}
	b->p = p;
	b->cap = cap;
}

static void buf_add(struct buf *b, const void *data, size_t n)
{
	buf_reserve(b, n);
	memcpy(b->p + b->len, data, n);
	b->len += n;
	b->p[b->len] = 0;
}

/* Formats once when the text fits in 256 bytes of room (nearly always): the agent builds its
 * messages from many small pieces, and each vsnprintf costs under TCG. */
static void buf_printf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	buf_reserve(b, 256);
	va_start(ap, fmt);
	int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
	va_end(ap);
	if (n >= 0 && (size_t)n >= b->cap - b->len) {
		buf_reserve(b, (size_t)n + 1);
		va_start(ap, fmt);
		vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
		va_end(ap);
	}
	if (n > 0)
		b->len += (size_t)n;
}

static void buf_consume(struct buf *b, size_t n)
{
	memmove(b->p, b->p + n, b->len - n);
	b->len -= n;
	if (b->p)
		b->p[b->len] = 0;
}

/* A JSON string literal (quotes included); bytes >= 0x80 pass through (UTF-8 stays UTF-8). */
static void buf_json_str(struct buf *b, const char *s, size_t n)
{
	buf_add(b, "\"", 1);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\') {
			char e[2] = { '\\', (char)c };
			buf_add(b, e, 2);
		} else if (c < 0x20 || c == 0x7f) {
			buf_printf(b, "\\u%04x", c);
		} else {
			buf_add(b, &s[i], 1);
		}
	}
	buf_add(b, "\"", 1);
}

static void buf_base64(struct buf *b, const unsigned char *d, size_t n)
{
	static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	buf_reserve(b, (n + 2) / 3 * 4);
	char *o = b->p + b->len;
	size_t i = 0;
	for (; i + 2 < n; i += 3) {
		uint32_t v = (uint32_t)d[i] << 16 | (uint32_t)d[i + 1] << 8 | d[i + 2];
		*o++ = a[v >> 18];
		*o++ = a[(v >> 12) & 63];
		*o++ = a[(v >> 6) & 63];
		*o++ = a[v & 63];
	}
	if (i < n) {
		uint32_t v = (uint32_t)d[i] << 16 | (i + 1 < n ? (uint32_t)d[i + 1] << 8 : 0);
		*o++ = a[v >> 18];
		*o++ = a[(v >> 12) & 63];
		*o++ = i + 1 < n ? a[(v >> 6) & 63] : '=';
		*o++ = '=';
	}
	b->len = (size_t)(o - b->p);
	b->p[b->len] = 0;
}

/* Decode base64 in place; returns the decoded length or -1 on a bad character. */
static long base64_decode(char *s, size_t n)
{
	static signed char map[256];
	if (!map['B']) {
		memset(map, -1, sizeof map);
		const char *a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
		for (int i = 0; i < 64; i++)
			map[(unsigned char)a[i]] = (signed char)i;
	}
	size_t o = 0;
	uint32_t acc = 0;
	int bits = 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '=')
			break;
		if (c == '\n' || c == '\r')
			continue;
		if (map[c] < 0)
			return -1;
		acc = acc << 6 | (uint32_t)map[c];
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			s[o++] = (char)(acc >> bits);
		}
	}
	return (long)o;
}

/* ---- reading a flat object ---- */
#define JSON_MAX_FIELDS 16
#define JSON_MAX_ITEMS 256

enum jtype { J_NONE, J_STR, J_NUM, J_BOOL, J_NULL, J_ARR, J_OTHER };

struct jfield {
	char *key;
	enum jtype type;
	char *str;                  /* J_STR: unescaped, NUL-terminated (in the input buffer) */
	size_t len;
	double num;                 /* J_NUM, J_BOOL */
	char *raw;                  /* the value's text as received (to echo an id back) */
	size_t raw_len;
	char *items[JSON_MAX_ITEMS]; /* J_ARR of strings */
	int n_items;
};

struct jobj {
	struct jfield f[JSON_MAX_FIELDS];
	int n;
};

static char *j_ws(char *p)
{
	while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
		p++;
	return p;
}

/* Parse a string starting at the opening quote; unescape in place. Returns the end or NULL. */
static char *j_string(char *p, char **out, size_t *len)
{
	char *w = ++p, *start = p;
	while (*p && *p != '"') {
		if (*p == '\\') {
			p++;
			char c = *p;
			if (c == 'n') *w++ = '\n';
			else if (c == 't') *w++ = '\t';
			else if (c == 'r') *w++ = '\r';
			else if (c == 'b') *w++ = '\b';
			else if (c == 'f') *w++ = '\f';
			else if (c == 'u') {
				unsigned v = 0;
				for (int i = 1; i <= 4; i++) {
					char h = p[i];
					if (!h) return NULL;
					v = v * 16 + (unsigned)(h <= '9' ? h - '0' : (h | 32) - 'a' + 10);
				}
				p += 4;
				if (v < 0x80) *w++ = (char)v;
				else if (v < 0x800) { *w++ = (char)(0xc0 | v >> 6); *w++ = (char)(0x80 | (v & 63)); }
				else { *w++ = (char)(0xe0 | v >> 12); *w++ = (char)(0x80 | ((v >> 6) & 63)); *w++ = (char)(0x80 | (v & 63)); }
			} else if (c) *w++ = c;
			else return NULL;
			p++;
		} else {
			*w++ = *p++;
		}
	}
	if (*p != '"')
		return NULL;
	*len = (size_t)(w - start);
	*w = 0;          /* w <= p: safe, and the closing quote is consumed below */
	*out = start;
	return p + 1;
}

/* Skip any JSON value (for nested objects we do not read). */
static char *j_skip(char *p)
{
	int depth = 0;
	do {
		p = j_ws(p);
		if (*p == '"') {
			p++;
			while (*p && *p != '"')
				p += (*p == '\\' && p[1]) ? 2 : 1;
			if (!*p) return NULL;
			p++;
		} else if (*p == '{' || *p == '[') {
			depth++, p++;
		} else if (*p == '}' || *p == ']') {
			depth--, p++;
		} else if (*p == ',' || *p == ':') {
			p++;
		} else if (*p) {
			while (*p && !strchr(",}] \t\r\n", *p))
				p++;
		} else {
			return NULL;
		}
	} while (depth > 0);
	return p;
}

/* Parse one line holding an object. Returns 0 or -1 (not a JSON object we understand). */
static int json_parse(char *p, struct jobj *o)
{
	o->n = 0;
	p = j_ws(p);
	if (*p++ != '{')
		return -1;
	p = j_ws(p);
	if (*p == '}')
		return 0;
	for (;;) {
		p = j_ws(p);
		if (*p != '"')
			return -1;
		char *key;
		size_t klen;
		if (!(p = j_string(p, &key, &klen)))
			return -1;
		p = j_ws(p);
		if (*p++ != ':')
			return -1;
		p = j_ws(p);
		struct jfield *f = o->n < JSON_MAX_FIELDS ? &o->f[o->n++] : NULL;
		struct jfield scratch;
		if (!f)
			f = &scratch;
		memset(f, 0, sizeof *f);
		f->key = key;
		f->raw = p;
		if (*p == '"') {
			f->type = J_STR;
			if (!(p = j_string(p, &f->str, &f->len)))
				return -1;
		} else if (*p == '[') {
			char *q = j_ws(p + 1);
			f->type = J_ARR;
			if (*q == ']') {
				p = q + 1;
			} else {
				for (;;) {
					q = j_ws(q);
					if (*q != '"') { f->type = J_OTHER; p = j_skip(p); break; }
					char *s;
					size_t sl;
					if (!(q = j_string(q, &s, &sl)))
						return -1;
					if (f->n_items < JSON_MAX_ITEMS)
						f->items[f->n_items++] = s;
					q = j_ws(q);
					if (*q == ',') { q++; continue; }
					if (*q == ']') { p = q + 1; break; }
					return -1;
				}
			}
		} else if (*p == '{') {
			f->type = J_OTHER;
			p = j_skip(p);
		} else if (!strncmp(p, "true", 4) || !strncmp(p, "false", 5)) {
			f->type = J_BOOL;
			f->num = *p == 't';
			p += *p == 't' ? 4 : 5;
		} else if (!strncmp(p, "null", 4)) {
			f->type = J_NULL;
			p += 4;
		} else {
			char *end;
			f->num = strtod(p, &end);
			if (end == p)
				return -1;
			f->type = J_NUM;
			p = end;
		}
		if (!p)
			return -1;
		f->raw_len = (size_t)(p - f->raw);
		p = j_ws(p);
		if (*p == ',') { p++; continue; }
		if (*p == '}') return 0;
		return -1;
	}
}

static struct jfield *json_get(struct jobj *o, const char *key)
{
	for (int i = 0; i < o->n; i++)
		if (!strcmp(o->f[i].key, key))
			return &o->f[i];
	return NULL;
}

static const char *json_str(struct jobj *o, const char *key)
{
	struct jfield *f = json_get(o, key);
	return f && f->type == J_STR ? f->str : NULL;
}

#endif
