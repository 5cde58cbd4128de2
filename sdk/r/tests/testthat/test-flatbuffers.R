# The FlatBuffers reader and builder on their own (R/flatbuffers.R).

test_that("scalars round-trip at their limits", {
  cases <- list(bool = c(TRUE, FALSE), i8 = c(-128, 0, 127), u8 = c(0, 255),
                i16 = c(-32768, 32767), u16 = c(0, 65535), i32 = c(-2147483648, 2147483647),
                u32 = c(0, 2147483648, 4294967295), i64 = c(-2^53, -1, 0, 2^40, 2^53 - 1),
                u64 = c(0, 2^32, 2^53 - 1), f32 = c(0.25, -1.5, 3), f64 = c(5.1, -0.2, 1e300))
  for (kind in names(cases)) {
    bytes <- fb_pack(cases[[kind]], kind)
    expect_length(bytes, FB_SIZES[[kind]] * length(cases[[kind]]))
    expect_identical(fb_unpack(bytes, kind), if (kind == "bool") cases[[kind]] else as.numeric(cases[[kind]]),
                     info = kind)
  }
})

test_that("64-bit integers are two's complement little-endian", {
  expect_identical(fb_pack(-5, "i64"), as.raw(c(0xfb, rep(0xff, 7))))
  expect_identical(fb_pack(2^40, "i64"), as.raw(c(0, 0, 0, 0, 0, 1, 0, 0)))
  expect_identical(fb_pack(4294967295, "u32"), as.raw(rep(0xff, 4)))
})

test_that("out-of-range and fractional integers are refused", {
  expect_error(fb_pack(256, "u8"), "does not fit")
  expect_error(fb_pack(-1, "u32"), "does not fit")
  expect_error(fb_pack(1.5, "i32"), "does not fit")
  expect_error(fb_pack(NA, "u64"), "does not fit")
})

test_that("a table with every kind of field reads back, absent fields take defaults", {
  buf <- fb_finish(function(b) fb_write_table(b, list(
    list(id = 0L, kind = "u8", value = 7),
    list(id = 1L, kind = "offset", value = function(b) fb_write_string(b, "h\u00e9llo")),
    list(id = 2L, kind = "offset", value = function(b) fb_write_scalars(b, c(-1, 2^52), "i64")),
    list(id = 4L, kind = "offset", value = function(b) fb_write_strings(b, c("a", "", "bc"))),
    list(id = 5L, kind = "offset", value = function(b) fb_write_offsets(b, list(1, 2), function(b, v) {
      fb_write_table(b, list(list(id = 0L, kind = "f64", value = v)))
    })),
    list(id = 6L, kind = "i64", value = -3)
  )), identifier = "TEST")
  root <- fb_root(buf, "TEST")
  expect_identical(fb_get_scalar(root, 0L, "u8", 0), 7)
  expect_identical(fb_get_string(root, 1L), "h\u00e9llo")
  expect_identical(fb_get_scalars(root, 2L, "i64"), c(-1, 2^52))
  expect_identical(fb_get_scalars(root, 3L, "u32"), numeric(0))  # absent vector
  expect_identical(fb_get_strings(root, 4L), c("a", "", "bc"))
  subs <- fb_get_tables(root, 5L)
  expect_identical(vapply(subs, function(t) fb_get_scalar(t, 0L, "f64", 0), 0), c(1, 2))
  expect_identical(fb_get_scalar(root, 6L, "i64", 0), -3)
  expect_identical(fb_get_scalar(root, 40L, "u32", 9), 9)  # past the vtable: default
  expect_null(fb_get_table(root, 3L))
  expect_identical(fb_get_string(root, 3L), "")
})

test_that("scalars are aligned to their size and vectors of longs to 8", {
  buf <- fb_finish(function(b) fb_write_table(b, list(
    list(id = 0L, kind = "u8", value = 1),
    list(id = 1L, kind = "f64", value = 2),
    list(id = 2L, kind = "offset", value = function(b) fb_write_string(b, "x")),
    list(id = 3L, kind = "offset", value = function(b) fb_write_scalars(b, c(1, 2), "i64"))
  )), identifier = "TEST")
  root <- fb_root(buf, "TEST")
  expect_equal(root$pos %% 8, 0)
  expect_equal((root$pos + fb_field(root, 1L)) %% 8, 0)
  v <- fb_vector(root, 3L)
  expect_equal(v$start %% 8, 0)
  expect_equal(length(buf) %% 8, 0)
})

test_that("bad buffers raise ketch_decode_error, never something else", {
  expect_error(fb_root(as.raw(1:3)), class = "ketch_decode_error")
  expect_error(fb_root(charToRaw("12345678WXYZ"), "KTCH"), class = "ketch_decode_error")
  bogus <- c(fb_pack(1000, "u32"), charToRaw("KTCH"))
  expect_error(fb_root(bogus, "KTCH"), class = "ketch_decode_error")
})
