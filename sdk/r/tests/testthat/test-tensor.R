# Payload frames <-> R values (R/tensor.R).

test_that("golden payloads decode to the values they hold", {
  twin <- read_twin("predict_request")
  p <- twin_payloads(twin)
  expect_identical(ketch_payload_to_value("FLOAT64", 4, p[[1]]), c(5.1, 3.5, 1.4, 0.2))
  expect_identical(ketch_payload_to_value("FLOAT32", 3, twin_payloads(read_twin("reply_ok"))[[1]]),
                   c(0.25, -1.5, 3))
  mixed <- twin_payloads(read_twin("reply_mixed"))
  expect_identical(ketch_payload_to_value("INT64", c(2, 1), mixed[[3]]), array(c(-5, 2^40), dim = c(2, 1)))
  expect_identical(ketch_payload_to_value("JSON", numeric(0), mixed[[1]]), -1L)
  expect_identical(ketch_payload_to_value("STRING", numeric(0), twin_payloads(read_twin("query_many_strings"))[[3]]),
                   "\u65e5\u672c")
})

test_that("arrays go in C order on the wire", {
  payload <- fb_pack(0:5, "i32")
  m <- ketch_payload_to_value("INT32", c(2, 3), payload)
  expect_identical(m, rbind(0:2, 3:5))
  back <- ketch_value_to_payload(m)
  expect_identical(back$shape, c(2, 3))
  expect_identical(back$payload, payload)
  a <- ketch_payload_to_value("INT16", c(2, 2, 2), fb_pack(0:7, "i16"))
  expect_identical(a[2, 1, 2], 5L)
})

test_that("every numeric dtype round-trips", {
  values <- list(BOOL = c(TRUE, FALSE, TRUE), INT8 = c(-128L, 5L, 127L), INT16 = c(-32768L, 1L),
                 INT32 = c(-2147483647L, 0L, 7L), INT64 = c(-2^53, -1, 2^53 - 1),
                 UINT8 = c(0L, 255L), UINT16 = c(0L, 65535L), UINT32 = c(0, 4294967295),
                 UINT64 = c(0, 2^53 - 1), FLOAT16 = c(1, -2, 0.5, 65504, 2^-24),
                 FLOAT32 = c(0.25, -1.5, 3), FLOAT64 = c(pi, -1e-300, Inf))
  for (dtype in names(values)) {
    v <- values[[dtype]]
    enc <- ketch_value_to_payload(ketch_tensor(v, dtype))
    expect_identical(enc$dtype, dtype)
    expect_identical(enc$shape, as.numeric(length(v)))
    expect_length(enc$payload, KETCH_ITEMSIZE[[dtype]] * length(v))
    expect_identical(ketch_payload_to_value(dtype, enc$shape, enc$payload), v, info = dtype)
  }
})

test_that("float16 rounds to nearest even and knows the special values", {
  bits <- function(x) fb_unpack(ketch_value_to_payload(ketch_tensor(x, "float16"))$payload, "u16")
  expect_identical(bits(c(1, -2, 65504, 2^-24, 0.1, 1 + 2^-11, 1 + 3 * 2^-11, 1e6, -Inf)),
                   c(0x3C00, 0xC000, 0x7BFF, 0x0001, 0x2E66, 0x3C00, 0x3C02, 0x7C00, 0xFC00))
  expect_true(is.nan(half_to_double(bits(NaN))))
})

test_that("the R type picks the dtype and the shape", {
  expect_identical(ketch_value_to_payload(3.5)[c("dtype", "shape")], list(dtype = "FLOAT64", shape = numeric(0)))
  expect_identical(ketch_value_to_payload(1:4)[c("dtype", "shape")], list(dtype = "INT32", shape = 4))
  expect_identical(ketch_value_to_payload(TRUE)$dtype, "BOOL")
  expect_identical(ketch_value_to_payload(as.raw(1:3))$dtype, "BYTES")
  s <- ketch_value_to_payload("h\u00e9")
  expect_identical(s$dtype, "STRING")
  expect_identical(s$payload, charToRaw("h\u00e9"))
  j <- ketch_value_to_payload(list(a = 1, b = c("x", "y")))
  expect_identical(j$dtype, "JSON")
  expect_identical(rawToChar(j$payload), '{"a":1,"b":["x","y"]}')
  expect_identical(rawToChar(ketch_value_to_payload(NULL)$payload), "null")
  expect_identical(ketch_value_to_payload(c("a", "b"))$dtype, "JSON")
  expect_identical(ketch_value_to_payload(ketch_tensor(2, shape = 1))$shape, 1)
  expect_identical(ketch_value_to_payload(matrix(1, 2, 3))$shape, c(2, 3))
})

test_that("text payloads decode as raw, character and JSON", {
  expect_identical(ketch_payload_to_value("BYTES", numeric(0), as.raw(c(0, 255))), as.raw(c(0, 255)))
  expect_null(ketch_payload_to_value("JSON", numeric(0), raw(0)))
  expect_identical(ketch_payload_to_value("JSON", numeric(0), charToRaw('{"x":[1,2]}')), list(x = c(1L, 2L)))
  expect_error(ketch_payload_to_value("STRING", numeric(0), as.raw(c(0xff, 0xfe))), "UTF-8")
})

test_that("values that do not fit their dtype are refused", {
  expect_error(ketch_payload_to_value("FLOAT64", 4, raw(8)), "does not match")
  expect_error(ketch_value_to_payload(NA), "NA")
  expect_error(ketch_value_to_payload(ketch_tensor(300, "uint8")), "does not fit")
  expect_error(ketch_value_to_payload(ketch_tensor(1:3, shape = c(2, 2))), "does not hold")
  expect_error(ketch_value_to_payload(ketch_tensor(1, "string")), "STRING")
  expect_error(ketch_tensor(1, "float128"), "unknown dtype")
})
