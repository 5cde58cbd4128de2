# A small FlatBuffers reader and builder in plain R, enough for schemas/ketch.fbs.
#
# Binary format (google/flatbuffers "Internals"), all little-endian:
#   - a buffer starts with a uoffset (uint32) to the root table, optionally followed by a
#     4-byte file identifier ("KTCH");
#   - a uoffset at position p points forward to p + value; it is used for tables,
#     strings and vectors referenced from a table or a vector;
#   - a table starts with an soffset (int32): its vtable lives at table - soffset;
#   - a vtable is uint16s: [vtable bytes, table inline bytes, offset of field 0, ...];
#     an offset of 0 (or a field id past the end of the vtable) means "absent, take the
#     schema default";
#   - a string is uint32 byte length, UTF-8 bytes, a 0 terminator; a vector is uint32
#     element count then the elements (scalars inline, tables/strings as uoffsets);
#   - every scalar is aligned to its own size, counted from the start of the buffer.
#
# Positions in this file are 0-based byte offsets into a raw vector, as in the format
# description. The builder writes forward: the root table comes first and every child
# (string, vector, sub-table) is written after the table that points to it, so every
# uoffset is positive, as the format requires. It does not share vtables or strings.
#
# 64-bit integers are held as doubles: exact for |x| < 2^53 (docs/protocol.md section 2
# asks peers to keep ids below that bound).

FB_SIZES <- c(bool = 1L, i8 = 1L, u8 = 1L, i16 = 2L, u16 = 2L, i32 = 4L, u32 = 4L,
              i64 = 8L, u64 = 8L, f32 = 4L, f64 = 8L)

fb_error <- function(..., class = NULL) {
  stop(structure(class = c(class, "ketch_decode_error", "error", "condition"),
                 list(message = paste0(...), call = NULL)))
}

# ---------------------------------------------------------------- scalar codecs

# Raw bytes of little-endian scalars -> R values (numeric, or logical for bool).
# 32- and 64-bit integers are assembled from unsigned 16-bit halves: R's integer type
# cannot hold -2^31 (it is NA_integer_), so readBin(size = 4) would lose that value.
fb_unpack <- function(bytes, kind, n = length(bytes) %/% FB_SIZES[[kind]]) {
  if (n == 0L) return(if (kind == "bool") logical(0) else numeric(0))
  switch(kind,
    bool = bytes[seq_len(n)] != as.raw(0L),
    i8 = as.numeric(readBin(bytes, "integer", n = n, size = 1L, signed = TRUE)),
    u8 = as.numeric(readBin(bytes, "integer", n = n, size = 1L, signed = FALSE)),
    i16 = as.numeric(readBin(bytes, "integer", n = n, size = 2L, signed = TRUE, endian = "little")),
    u16 = as.numeric(readBin(bytes, "integer", n = n, size = 2L, signed = FALSE, endian = "little")),
    i32 = {
      u <- fb_words(bytes, n)
      ifelse(u >= 2147483648, u - 4294967296, u)
    },
    u32 = fb_words(bytes, n),
    i64 = , u64 = {
      w <- fb_words(bytes, 2L * n)
      lo <- w[c(TRUE, FALSE)]
      hi <- w[c(FALSE, TRUE)]
      if (kind == "i64") hi <- ifelse(hi >= 2147483648, hi - 4294967296, hi)
      hi * 4294967296 + lo
    },
    f32 = readBin(bytes, "double", n = n, size = 4L, endian = "little"),
    f64 = readBin(bytes, "double", n = n, size = 8L, endian = "little"),
    stop("unknown scalar kind ", kind)
  )
}

# n unsigned 32-bit little-endian words as doubles.
fb_words <- function(bytes, n) {
  h <- as.numeric(readBin(bytes, "integer", n = 2L * n, size = 2L, signed = FALSE, endian = "little"))
  h[c(TRUE, FALSE)] + 65536 * h[c(FALSE, TRUE)]
}

# Whole doubles in [0, 256^size) as `size` little-endian bytes each.
fb_le_bytes <- function(u, size) {
  m <- vapply(seq_len(size) - 1, function(k) (u %/% 256^k) %% 256, numeric(length(u)))
  as.raw(t(matrix(m, nrow = length(u))))
}

FB_RANGES <- list(i8 = c(-128, 127), u8 = c(0, 255), i16 = c(-32768, 32767), u16 = c(0, 65535),
                  i32 = c(-2147483648, 2147483647), u32 = c(0, 4294967295),
                  i64 = c(-2^63, 2^63 - 1), u64 = c(0, 2^64 - 1))

# R values -> raw bytes of little-endian scalars. Integers must be whole and in range.
fb_pack <- function(values, kind) {
  if (kind == "bool") {
    if (anyNA(values)) stop("bool value is NA")
    return(as.raw(as.logical(values)))
  }
  if (kind == "f32") return(writeBin(as.double(values), raw(), size = 4L, endian = "little"))
  if (kind == "f64") return(writeBin(as.double(values), raw(), size = 8L, endian = "little"))
  v <- as.double(values)
  range <- FB_RANGES[[kind]]
  if (is.null(range)) stop("unknown scalar kind ", kind)
  bad <- is.na(v) | v != floor(v) | v < range[1] | v > range[2]
  if (any(bad)) stop(sprintf("value %s does not fit %s", format(v[bad][1], digits = 17), kind))
  size <- FB_SIZES[[kind]]
  if (size <= 4) return(fb_le_bytes(ifelse(v < 0, v + 256^size, v), size))
  hi <- floor(v / 4294967296)  # negative values: two's complement through floor
  lo <- v - hi * 4294967296    # always in [0, 2^32)
  hi <- ifelse(hi < 0, hi + 4294967296, hi)
  fb_le_bytes(as.vector(rbind(lo, hi)), 4L)
}

# ---------------------------------------------------------------- reader

fb_bytes <- function(buf, pos, n) {
  if (pos < 0 || n < 0 || pos + n > length(buf)) {
    fb_error(sprintf("read of %.0f bytes at %.0f is past the end of a %d-byte buffer",
                     n, pos, length(buf)))
  }
  buf[seq.int(pos + 1, length.out = n)]
}

fb_read <- function(buf, pos, kind) fb_unpack(fb_bytes(buf, pos, FB_SIZES[[kind]]), kind)

# A table handle: the buffer, the table position and its vtable.
fb_table <- function(buf, pos) {
  vt <- pos - fb_read(buf, pos, "i32")
  vt_size <- fb_read(buf, vt, "u16")
  if (vt_size < 4 || vt_size %% 2 != 0) fb_error(sprintf("bad vtable size %.0f at %.0f", vt_size, vt))
  fb_bytes(buf, vt, vt_size)
  list(buf = buf, pos = pos, vt = vt, vt_size = vt_size)
}

# Root table of a buffer, after checking the file identifier when one is given.
fb_root <- function(buf, identifier = NULL) {
  if (!is.raw(buf)) fb_error("a flatbuffer must be a raw vector")
  if (length(buf) < 8) fb_error(sprintf("buffer of %d bytes is too short", length(buf)))
  if (!is.null(identifier) && !identical(buf[5:8], charToRaw(identifier))) {
    fb_error(sprintf("missing file identifier %s", identifier))
  }
  fb_table(buf, fb_read(buf, 0, "u32"))
}

# Offset of field `id` (0-based, schema order) inside the table, 0 when absent.
fb_field <- function(tab, id) {
  slot <- 4 + 2 * id
  if (slot >= tab$vt_size) return(0)
  fb_read(tab$buf, tab$vt + slot, "u16")
}

fb_get_scalar <- function(tab, id, kind, default) {
  off <- fb_field(tab, id)
  if (off == 0) default else fb_read(tab$buf, tab$pos + off, kind)
}

# Follow the uoffset stored at `pos`.
fb_deref <- function(buf, pos) pos + fb_read(buf, pos, "u32")

fb_string_at <- function(buf, pos) {
  n <- fb_read(buf, pos, "u32")
  bytes <- fb_bytes(buf, pos + 4, n)
  if (any(bytes == as.raw(0L))) fb_error("string contains a NUL byte")
  s <- rawToChar(bytes)
  Encoding(s) <- "UTF-8"
  if (!validUTF8(s)) fb_error("string is not valid UTF-8")
  s
}

fb_get_string <- function(tab, id) {
  off <- fb_field(tab, id)
  if (off == 0) "" else fb_string_at(tab$buf, fb_deref(tab$buf, tab$pos + off))
}

# Position of the first element and the element count of a vector field (NULL if absent).
fb_vector <- function(tab, id) {
  off <- fb_field(tab, id)
  if (off == 0) return(NULL)
  v <- fb_deref(tab$buf, tab$pos + off)
  list(start = v + 4, n = fb_read(tab$buf, v, "u32"))
}

fb_get_scalars <- function(tab, id, kind) {
  v <- fb_vector(tab, id)
  if (is.null(v)) return(fb_unpack(raw(0), kind))
  size <- FB_SIZES[[kind]]
  fb_unpack(fb_bytes(tab$buf, v$start, v$n * size), kind, v$n)
}

fb_get_strings <- function(tab, id) {
  v <- fb_vector(tab, id)
  if (is.null(v) || v$n == 0) return(character(0))
  fb_bytes(tab$buf, v$start, v$n * 4)
  vapply(seq_len(v$n) - 1, function(i) fb_string_at(tab$buf, fb_deref(tab$buf, v$start + 4 * i)),
         character(1), USE.NAMES = FALSE)
}

fb_get_tables <- function(tab, id) {
  v <- fb_vector(tab, id)
  if (is.null(v) || v$n == 0) return(list())
  fb_bytes(tab$buf, v$start, v$n * 4)
  lapply(seq_len(v$n) - 1, function(i) fb_table(tab$buf, fb_deref(tab$buf, v$start + 4 * i)))
}

fb_get_table <- function(tab, id) {
  off <- fb_field(tab, id)
  if (off == 0) NULL else fb_table(tab$buf, fb_deref(tab$buf, tab$pos + off))
}

# ---------------------------------------------------------------- builder

# A growable byte buffer. Children are written through "writer" functions that append
# to it and return the position the parent's uoffset must point to.
fb_builder <- function(capacity = 256L) {
  b <- new.env(parent = emptyenv())
  b$buf <- raw(capacity)
  b$len <- 0
  b
}

fb_put <- function(b, bytes) {
  n <- length(bytes)
  need <- b$len + n
  if (need > length(b$buf)) b$buf <- c(b$buf, raw(max(need, 2 * length(b$buf)) - length(b$buf)))
  pos <- b$len
  if (n > 0) b$buf[seq.int(pos + 1, length.out = n)] <- bytes
  b$len <- need
  pos
}

fb_patch <- function(b, pos, bytes) {
  b$buf[seq.int(pos + 1, length.out = length(bytes))] <- bytes
  invisible(NULL)
}

# Pad with zeros until (len + extra) is a multiple of `align`.
fb_align <- function(b, align, extra = 0) {
  pad <- (-(b$len + extra)) %% align
  if (pad > 0) fb_put(b, raw(pad))
  invisible(NULL)
}

fb_put_uoffset <- function(b, slot, target) {
  if (target <= slot) stop("flatbuffers uoffsets must point forward")
  fb_patch(b, slot, fb_pack(target - slot, "u32"))
}

fb_write_string <- function(b, s) {
  bytes <- charToRaw(enc2utf8(as.character(s)))
  fb_align(b, 4L)
  pos <- fb_put(b, fb_pack(length(bytes), "u32"))
  fb_put(b, c(bytes, as.raw(0L)))
  pos
}

fb_write_scalars <- function(b, values, kind) {
  size <- FB_SIZES[[kind]]
  fb_align(b, max(4L, size), extra = 4)  # elements aligned to their size, count to 4
  pos <- fb_put(b, fb_pack(length(values), "u32"))
  fb_put(b, fb_pack(values, kind))
  pos
}

# A vector of uoffsets; writer(b, item) writes one element and returns its position.
fb_write_offsets <- function(b, items, writer) {
  fb_align(b, 4L)
  pos <- fb_put(b, fb_pack(length(items), "u32"))
  slots <- fb_put(b, raw(4 * length(items)))
  for (i in seq_along(items)) fb_put_uoffset(b, slots + 4 * (i - 1), writer(b, items[[i]]))
  pos
}

fb_write_strings <- function(b, values) fb_write_offsets(b, as.list(values), fb_write_string)

# Write one table. `fields` is a list of list(id, kind, value): kind is a scalar kind
# (value written inline) or "offset" (value is a writer function for a child).
# Callers leave out fields that hold their default. Returns the table position.
fb_write_table <- function(b, fields) {
  sizes <- vapply(fields, function(f) if (f$kind == "offset") 4L else FB_SIZES[[f$kind]], 1L)
  ids <- vapply(fields, function(f) as.integer(f$id), 1L)
  # inline layout: the soffset, then the fields from the largest to the smallest
  order <- order(-sizes, ids)
  offsets <- integer(length(fields))
  cur <- 4L
  for (i in order) {
    cur <- cur + ((-cur) %% sizes[i])
    offsets[i] <- cur
    cur <- cur + sizes[i]
  }
  table_size <- cur
  n_slots <- if (length(ids)) max(ids) + 1L else 0L
  vtable <- integer(2L + n_slots)
  vtable[1:2] <- c(4L + 2L * n_slots, table_size)
  vtable[ids + 3L] <- offsets
  # vtable first, then the table aligned to its largest scalar
  fb_align(b, 2L)
  vt_pos <- fb_put(b, fb_pack(vtable, "u16"))
  fb_align(b, max(4L, sizes))
  pos <- fb_put(b, raw(table_size))
  fb_patch(b, pos, fb_pack(pos - vt_pos, "i32"))
  for (i in seq_along(fields)) {
    f <- fields[[i]]
    if (f$kind != "offset") fb_patch(b, pos + offsets[i], fb_pack(f$value, f$kind))
  }
  # children after the table, so that every uoffset points forward
  for (i in seq_along(fields)) {
    f <- fields[[i]]
    if (f$kind == "offset") fb_put_uoffset(b, pos + offsets[i], f$value(b))
  }
  pos
}

# A finished buffer: root uoffset, file identifier, then the root table and its children.
fb_finish <- function(root_writer, identifier = NULL, capacity = 256L) {
  b <- fb_builder(capacity)
  fb_put(b, raw(4))
  if (!is.null(identifier)) {
    id <- charToRaw(identifier)
    if (length(id) != 4) stop("a file identifier has 4 bytes")
    fb_put(b, id)
  }
  fb_put_uoffset(b, 0, root_writer(b))
  fb_align(b, 8L)
  b$buf[seq_len(b$len)]
}
