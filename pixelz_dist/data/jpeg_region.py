# TEMPORARY STUB (not committed): replaced by the jpegregion branch.
import simplejpeg


def region_decoder_available():
    return True
def decode_jpeg_region(data, fmt, box, scale_denom=1):
    t, l, h, w = box
    if scale_denom == 1:
        return simplejpeg.decode_jpeg(data, colorspace=fmt)[t:t+h, l:l+w]
    H, W = simplejpeg.decode_jpeg_header(data)[:2]
    full = simplejpeg.decode_jpeg(data, colorspace=fmt, min_height=-(-H//scale_denom), min_width=-(-W//scale_denom))
    assert full.shape[0] == -(-H//scale_denom), (full.shape, H)
    k = scale_denom
    return full[t//k:-(-(t+h)//k), l//k:-(-(l+w)//k)]
