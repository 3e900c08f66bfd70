/* Decode one box of a JPEG with libjpeg's classic API: rows above the box are skipped, columns outside it are not
 * colour-converted, rows below it are never decoded.
 *
 * Python face: pixelz_dist/data/jpeg_region.py. One function:
 *
 *     decode_region(data, fmt, top, left, height, width, scale_denom, margin) -> (bytearray, out_h, out_w, channels)
 *
 * The box is in full-resolution pixels; with scale_denom k > 1 libjpeg scales in the DCT domain to
 * ceil(H / k) x ceil(W / k) and the result covers rows floor(top / k) .. ceil((top + height) / k) and columns
 * floor(left / k) .. ceil((left + width) / k) of that scaled image.
 *
 * Exactness: jpeg_skip_scanlines and jpeg_crop_scanline restart chroma upsampling at the edge of what they decode, so
 * the first row after a skip and the edge columns of a crop can differ from a whole decode. `margin` iMCUs (1 in the
 * Python face) are decoded on each side of the box and cut away here, so the box equals the whole decode cropped.
 *
 * Every libjpeg warning (corrupt data, premature end of data) is an error, as in the library's other JPEG backends;
 * nothing is printed and exit() is never called: libjpeg's errors longjmp back here and raise ValueError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} region_error_mgr;

static void region_error_exit(j_common_ptr cinfo)
{
    region_error_mgr *err = (region_error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void region_emit_message(j_common_ptr cinfo, int msg_level)
{
    /* msg_level < 0 is a warning (e.g. corrupt data, premature end): stop there, as the other backends do. */
    if (msg_level < 0)
        region_error_exit(cinfo);
}

static void region_output_message(j_common_ptr cinfo)
{
    (void)cinfo; /* never print: the message travels in the ValueError */
}

static JDIMENSION div_up(JDIMENSION a, JDIMENSION b) { return (a + b - 1) / b; }

static PyObject *decode_region(PyObject *self, PyObject *args)
{
    Py_buffer data;
    const char *fmt;
    long long top, left, height, width;
    int scale, margin;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*sLLLLii", &data, &fmt, &top, &left, &height, &width, &scale, &margin))
        return NULL;

    J_COLOR_SPACE space;
    int channels;
    if (strcmp(fmt, "RGB") == 0) {
        space = JCS_RGB;
        channels = 3;
    } else if (strcmp(fmt, "GRAY") == 0) {
        space = JCS_GRAYSCALE;
        channels = 1;
    } else if (strcmp(fmt, "RGBX") == 0) {
        space = JCS_EXT_RGBX;
        channels = 4;
    } else {
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "fmt must be 'RGB', 'GRAY' or 'RGBX', not %R", PyTuple_GET_ITEM(args, 1));
        return NULL;
    }
    if (scale != 1 && scale != 2 && scale != 4 && scale != 8) {
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "scale_denom must be 1, 2, 4 or 8, not %d", scale);
        return NULL;
    }
    if (top < 0 || left < 0 || height < 1 || width < 1 || margin < 0) {
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError,
                     "box (top, left, height, width) = (%lld, %lld, %lld, %lld) must have top, left >= 0 and "
                     "height, width >= 1",
                     top, left, height, width);
        return NULL;
    }

    struct jpeg_decompress_struct cinfo;
    region_error_mgr jerr;
    /* Changed after setjmp and read after a longjmp: volatile, so their values survive the jump. */
    PyObject *volatile out = NULL;
    PyThreadState *volatile released = NULL;
    volatile int created = 0;
    JDIMENSION out_h = 0, out_w = 0;

    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = region_error_exit;
    jerr.pub.emit_message = region_emit_message;
    jerr.pub.output_message = region_output_message;
    jerr.message[0] = '\0';

    if (setjmp(jerr.jump)) {
        if (released)
            PyEval_RestoreThread(released);
        if (created)
            jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        Py_XDECREF(out);
        PyErr_Format(PyExc_ValueError, "libjpeg could not decode the data: %s", jerr.message);
        return NULL;
    }

    jpeg_create_decompress(&cinfo);
    created = 1;
    if (data.len > 0xFFFFFFFFL) {
        strcpy(jerr.message, "the data is larger than 4 GiB");
        longjmp(jerr.jump, 1);
    }
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = space;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale;
    jpeg_calc_output_dimensions(&cinfo);

    if (top + height > (long long)cinfo.image_height || left + width > (long long)cinfo.image_width) {
        PyErr_Format(PyExc_ValueError,
                     "box (top, left, height, width) = (%lld, %lld, %lld, %lld) does not lie inside the %u x %u "
                     "(height x width) image; clip it to the image first",
                     top, left, height, width, cinfo.image_height, cinfo.image_width);
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    /* The box in the scaled image: floor(start / k) .. ceil(end / k), clipped to the scaled size. */
    JDIMENSION r0 = (JDIMENSION)(top / scale), c0 = (JDIMENSION)(left / scale);
    JDIMENSION r1 = div_up((JDIMENSION)(top + height), scale), c1 = div_up((JDIMENSION)(left + width), scale);
    if (r1 > cinfo.output_height)
        r1 = cinfo.output_height;
    if (c1 > cinfo.output_width)
        c1 = cinfo.output_width;
    out_h = r1 - r0;
    out_w = c1 - c0;
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)out_h * out_w * channels);
    if (out == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned char *dst = (unsigned char *)PyByteArray_AS_STRING(out);

    /* One iMCU in output pixels (the unit jpeg_skip_scanlines and jpeg_crop_scanline work in), or more for a
     * one-component file: a margin only has to be at least that wide. */
#if JPEG_LIB_VERSION >= 70
    JDIMENSION imcu_h = (JDIMENSION)(cinfo.max_v_samp_factor * cinfo.min_DCT_v_scaled_size);
    JDIMENSION imcu_w = (JDIMENSION)(cinfo.max_h_samp_factor * cinfo.min_DCT_h_scaled_size);
#else
    JDIMENSION imcu_h = (JDIMENSION)(cinfo.max_v_samp_factor * cinfo.min_DCT_scaled_size);
    JDIMENSION imcu_w = (JDIMENSION)(cinfo.max_h_samp_factor * cinfo.min_DCT_scaled_size);
#endif
    JDIMENSION first_row = r0 / imcu_h > (JDIMENSION)margin ? (r0 / imcu_h - margin) * imcu_h : 0;
    JDIMENSION crop_x = c0 / imcu_w > (JDIMENSION)margin ? (c0 / imcu_w - margin) * imcu_w : 0;
    JDIMENSION crop_end = (div_up(c1, imcu_w) + margin) * imcu_w;
    if (crop_end > cinfo.output_width)
        crop_end = cinfo.output_width;

    released = PyEval_SaveThread();
    jpeg_start_decompress(&cinfo);
    JDIMENSION crop_w = crop_end - crop_x;
    if (crop_x > 0 || crop_w < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &crop_x, &crop_w); /* widens to iMCU columns: crop_x moves left, crop_w grows */
    if (first_row > 0 && jpeg_skip_scanlines(&cinfo, first_row) != first_row) {
        strcpy(jerr.message, "could not skip to the box's first row");
        longjmp(jerr.jump, 1);
    }
    /* Rows go straight into the result when the decoded columns are the box's (a full-width box); otherwise through
     * a scratch buffer (freed by jpeg_destroy_decompress on every path) whose box columns are copied. 16 rows a call:
     * one row a call cost about 10 % more on a 0.19 MP image. */
    enum { BATCH = 16 };
    JSAMPROW rows[BATCH];
    JSAMPARRAY scratch = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE,
                                                    cinfo.output_width * (JDIMENSION)cinfo.output_components, BATCH);
    size_t src_offset = (size_t)(c0 - crop_x) * channels, row_bytes = (size_t)out_w * channels;
    int direct = src_offset == 0 && cinfo.output_width == out_w;
    while (cinfo.output_scanline < r1) {
        JDIMENSION at = cinfo.output_scanline;
        JDIMENSION want = (at < r0 ? r0 : r1) - at; /* margin rows above the box apart from the box's own */
        if (want > BATCH)
            want = BATCH;
        int into_result = direct && at >= r0;
        for (JDIMENSION i = 0; i < want; i++)
            rows[i] = into_result ? dst + (size_t)(at - r0 + i) * row_bytes : scratch[i];
        JDIMENSION got = jpeg_read_scanlines(&cinfo, rows, want);
        if (got == 0) {
            strcpy(jerr.message, "no rows came out before the box's last row");
            longjmp(jerr.jump, 1);
        }
        if (at >= r0 && !into_result)
            for (JDIMENSION i = 0; i < got; i++)
                memcpy(dst + (size_t)(at - r0 + i) * row_bytes, scratch[i] + src_offset, row_bytes);
    }
    jpeg_abort_decompress(&cinfo); /* rows below the box are never decoded */
    jpeg_destroy_decompress(&cinfo);
    PyEval_RestoreThread(released);
    PyBuffer_Release(&data);
    return Py_BuildValue("(NIIi)", out, out_h, out_w, channels);
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, fmt, top, left, height, width, scale_denom, margin) -> (bytearray, height, width, channels)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_jpeg_region",
    .m_doc = "libjpeg region decoding (see jpeg_region.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
