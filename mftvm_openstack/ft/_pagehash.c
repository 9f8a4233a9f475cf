/*
 * _pagehash: per-page XXH3-128 hashes of guest RAM, for the hash tracker
 * (mftvm_openstack/ft/trackers.py, HashTracker).
 *
 * The per-page loop runs here, not in Python: a 2 GiB guest has 524 288
 * pages, and one Python call per page costs more than hashing the page.
 * Both functions release the GIL, so the tracker runs them on two threads
 * over parts of RAM.
 *
 * The hash is Debian's libxxhash (libxxhash-dev), keyed with a secret the
 * tracker draws from os.urandom: the guest, which writes the pages, does
 * not know it and so cannot aim a write at a hash collision. On x86-64 the
 * library's _dispatch entry points pick SSE2, AVX2 or AVX-512 at run time.
 *
 *   page_hash(data, secret) -> bytes       the 16-byte hash of one buffer
 *   hash_pages(ram, hashes, secret, first, last, found) -> n
 *       hash pages [first, last) of ram; where a page's hash differs from
 *       hashes[page], store the new one and write the page number into
 *       found[first + n], n counting up from 0
 *   copy_pages(ram, indices, pages, hashes, secret)
 *       copy page indices[j] of ram into pages[j] and store the hash of
 *       that copy: the stored hash is always that of what was shipped
 *
 * hashes holds two uint64 per page (low, high), found and indices uint32
 * page numbers; all are C-contiguous, aligned buffers (numpy arrays).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include <xxhash.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xxh_x86dispatch.h>
#define HASH XXH3_128bits_withSecret_dispatch
#else
#define HASH XXH3_128bits_withSecret
#endif

#define PAGE_SIZE 4096

static int check_secret(const Py_buffer *secret)
{
	if (secret->len < XXH3_SECRET_SIZE_MIN) {
		PyErr_Format(PyExc_ValueError, "secret must be at least %d bytes",
			     XXH3_SECRET_SIZE_MIN);
		return -1;
	}
	return 0;
}

static int check_aligned(const Py_buffer *buf, size_t align, const char *what)
{
	if ((uintptr_t)buf->buf % align) {
		PyErr_Format(PyExc_ValueError, "%s is not %zu-byte aligned", what,
			     align);
		return -1;
	}
	return 0;
}

static PyObject *page_hash(PyObject *self, PyObject *args)
{
	Py_buffer data, secret;
	XXH128_hash_t h;
	uint64_t out[2];

	(void)self;
	if (!PyArg_ParseTuple(args, "y*y*", &data, &secret))
		return NULL;
	if (check_secret(&secret) == 0) {
		h = HASH(data.buf, (size_t)data.len, secret.buf,
			 (size_t)secret.len);
		out[0] = h.low64;
		out[1] = h.high64;
	}
	PyBuffer_Release(&data);
	PyBuffer_Release(&secret);
	if (PyErr_Occurred())
		return NULL;
	return PyBytes_FromStringAndSize((const char *)out, sizeof(out));
}

static PyObject *hash_pages(PyObject *self, PyObject *args)
{
	Py_buffer ram, hashes, secret, found;
	Py_ssize_t first, last, npages, n = 0;

	(void)self;
	if (!PyArg_ParseTuple(args, "y*w*y*nnw*", &ram, &hashes, &secret,
			      &first, &last, &found))
		return NULL;
	npages = ram.len / PAGE_SIZE;
	if (check_secret(&secret) || check_aligned(&hashes, 8, "hashes") ||
	    check_aligned(&found, 4, "found"))
		goto out;
	if (first < 0 || first > last || last > npages) {
		PyErr_Format(PyExc_ValueError, "pages [%zd, %zd) are not in "
			     "RAM of %zd pages", first, last, npages);
		goto out;
	}
	if (hashes.len < last * 16 || found.len < last * 4) {
		PyErr_SetString(PyExc_ValueError,
				"hashes or found is too short");
		goto out;
	}
	{
		const uint8_t *r = ram.buf;
		uint64_t *h = hashes.buf;
		uint32_t *f = found.buf;

		Py_BEGIN_ALLOW_THREADS
		for (Py_ssize_t i = first; i < last; i++) {
			XXH128_hash_t v = HASH(r + i * PAGE_SIZE, PAGE_SIZE,
					       secret.buf, (size_t)secret.len);

			if (v.low64 != h[2 * i] || v.high64 != h[2 * i + 1]) {
				h[2 * i] = v.low64;
				h[2 * i + 1] = v.high64;
				f[first + n++] = (uint32_t)i;
			}
		}
		Py_END_ALLOW_THREADS
	}
out:
	PyBuffer_Release(&ram);
	PyBuffer_Release(&hashes);
	PyBuffer_Release(&secret);
	PyBuffer_Release(&found);
	if (PyErr_Occurred())
		return NULL;
	return PyLong_FromSsize_t(n);
}

static PyObject *copy_pages(PyObject *self, PyObject *args)
{
	Py_buffer ram, indices, pages, hashes, secret;
	Py_ssize_t npages, count;

	(void)self;
	if (!PyArg_ParseTuple(args, "y*y*w*w*y*", &ram, &indices, &pages,
			      &hashes, &secret))
		return NULL;
	npages = ram.len / PAGE_SIZE;
	count = indices.len / 4;
	if (check_secret(&secret) || check_aligned(&hashes, 8, "hashes") ||
	    check_aligned(&indices, 4, "indices"))
		goto out;
	if (pages.len < count * PAGE_SIZE || hashes.len < npages * 16) {
		PyErr_SetString(PyExc_ValueError,
				"pages or hashes is too short");
		goto out;
	}
	for (Py_ssize_t j = 0; j < count; j++) {
		if (((const uint32_t *)indices.buf)[j] >= (uint64_t)npages) {
			PyErr_Format(PyExc_ValueError, "page %u is not in RAM "
				     "of %zd pages",
				     ((const uint32_t *)indices.buf)[j], npages);
			goto out;
		}
	}
	{
		const uint8_t *r = ram.buf;
		const uint32_t *idx = indices.buf;
		uint8_t *p = pages.buf;
		uint64_t *h = hashes.buf;

		Py_BEGIN_ALLOW_THREADS
		for (Py_ssize_t j = 0; j < count; j++) {
			uint8_t *copy = p + j * PAGE_SIZE;
			XXH128_hash_t v;

			memcpy(copy, r + (size_t)idx[j] * PAGE_SIZE, PAGE_SIZE);
			v = HASH(copy, PAGE_SIZE, secret.buf,
				 (size_t)secret.len);
			h[2 * (size_t)idx[j]] = v.low64;
			h[2 * (size_t)idx[j] + 1] = v.high64;
		}
		Py_END_ALLOW_THREADS
	}
out:
	PyBuffer_Release(&ram);
	PyBuffer_Release(&indices);
	PyBuffer_Release(&pages);
	PyBuffer_Release(&hashes);
	PyBuffer_Release(&secret);
	if (PyErr_Occurred())
		return NULL;
	Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
	{"page_hash", page_hash, METH_VARARGS,
	 "page_hash(data, secret) -> the 16-byte XXH3-128 hash of data"},
	{"hash_pages", hash_pages, METH_VARARGS,
	 "hash_pages(ram, hashes, secret, first, last, found) -> the number "
	 "of pages in [first, last) whose hash changed, listed in "
	 "found[first:first + n]"},
	{"copy_pages", copy_pages, METH_VARARGS,
	 "copy_pages(ram, indices, pages, hashes, secret): copy the pages "
	 "indices of ram into pages; store each copy's hash"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_pagehash",
	"Per-page XXH3-128 hashes of guest RAM (see _pagehash.c).", -1,
	methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pagehash(void)
{
	return PyModule_Create(&module);
}
