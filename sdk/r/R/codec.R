# Codec for the Ketch wire protocol (schemas/ketch.fbs, docs/protocol.md).
#
# A message is [header][payload...]: the header is one flatbuffer whose root is an
# Envelope holding the protocol version and one body (a union member); payloads are raw
# frames. In R a decoded header is a "message":
#
#   list(type = "PredictRequest", version = 1, body = list(batch_id = 5, ...))
#
# with every field of the body present, in schema order:
#   string -> character(1) ("" when absent)        bool -> logical(1)
#   integer and float scalars -> double             enum -> its name, e.g. "FLOAT64"
#   vector of numbers -> double vector              vector of strings -> character
#   sub-table -> a list of its fields, NULL when absent
#   vector of tables -> an unnamed list of such lists
# 64-bit integers (ulong/long) are doubles: exact below 2^53, as the protocol requires.
#
# KETCH_SPEC lists every table's fields in schema order with a kind; the encoder, the
# decoder and the canonical JSON form are all driven by it, so each message is described
# once (as in the Python reference, sdk/python/ketch/protocol/).

#' @rdname ketch_codec
#' @format NULL
#' @export
KETCH_PROTOCOL_VERSION <- 1
#' @rdname ketch_codec
#' @format NULL
#' @export
KETCH_PROTOCOL_VERSIONS <- c(1, 2)
KETCH_IDENTIFIER <- "KTCH"

# The schema's codes, field table (KETCH_SPEC) and defaults are generated from
# schemas/ketch.fbs into schema_generated.R (scripts/gen_schema.py).

# ---------------------------------------------------------------- schema numbering
# The hot path (R/batch.R) reads and writes by field id; every id, the Envelope's included,
# comes from the generated KETCH_FIELD_IDS, and union member codes from KETCH_BODIES.

KETCH_IDENTIFIER_RAW <- charToRaw(KETCH_IDENTIFIER)

# The field ids of a table by name (the generated KETCH_FIELD_IDS may be sourced after this
# file, so it is looked up when called).
ketch_field_ids <- function(table) {
  ids <- KETCH_FIELD_IDS[[table]]
  if (is.null(ids)) stop("unknown table ", table)
  ids
}

ketch_field_default <- function(table, name, kind) {
  d <- KETCH_DEFAULTS[[paste0(table, ".", name)]]
  if (!is.null(d)) return(d)
  if (kind == "str") return("")
  if (kind == "bool") return(FALSE)
  if (kind %in% names(KETCH_ENUMS)) return(names(KETCH_ENUMS[[kind]]$codes)[1])
  if (startsWith(kind, "[")) return(ketch_empty_vector(substr(kind, 2, nchar(kind) - 1)))
  if (kind %in% names(KETCH_SPEC)) return(NULL)
  0
}

ketch_empty_vector <- function(elem) {
  if (elem == "str") character(0) else if (elem %in% names(KETCH_SPEC)) list() else numeric(0)
}

ketch_enum_name <- function(kind, code) {
  codes <- KETCH_ENUMS[[kind]]$codes
  name <- names(codes)[match(code, codes)]
  if (is.na(name)) code else name  # an unknown code stays a number, as in Python
}

ketch_enum_code <- function(kind, value) {
  codes <- KETCH_ENUMS[[kind]]$codes
  if (is.character(value)) {
    code <- codes[toupper(value)]
    if (is.na(code)) stop(sprintf("unknown %s name %s", kind, value))
    return(unname(code))
  }
  as.numeric(value)
}

# ---------------------------------------------------------------- normalising

# A body given as a (possibly partial) named list, e.g. parsed from JSON, as the full
# typed form described at the top of this file. Unknown field names are an error.
ketch_normalize <- function(table, fields) {
  spec <- KETCH_SPEC[[table]]
  if (is.null(spec)) stop("unknown table ", table)
  fields <- if (is.null(fields)) list() else as.list(fields)
  unknown <- setdiff(names(fields), names(spec))
  if (length(unknown)) stop(sprintf("%s has no field(s) %s", table, paste(unknown, collapse = ", ")))
  out <- vector("list", length(spec))
  names(out) <- names(spec)
  for (name in names(spec)) {
    kind <- spec[[name]]
    value <- fields[[name]]
    out[name] <- list(if (is.null(value)) ketch_field_default(table, name, kind)
                      else ketch_coerce(kind, value, paste0(table, ".", name)))
  }
  out
}

ketch_coerce <- function(kind, value, where) {
  one <- function(v) {
    if (length(v) != 1) stop(sprintf("%s must be a single value", where))
    v
  }
  if (kind == "str") return(enc2utf8(as.character(one(unlist(value)))))
  if (kind == "bool") return(as.logical(one(unlist(value))))
  if (kind %in% names(KETCH_ENUMS)) {
    v <- one(unlist(value))
    return(if (is.character(v)) toupper(v) else ketch_enum_name(kind, v))
  }
  if (kind %in% names(KETCH_SPEC)) return(ketch_normalize(kind, value))
  if (startsWith(kind, "[")) {
    elem <- substr(kind, 2, nchar(kind) - 1)
    if (elem %in% names(KETCH_SPEC)) return(lapply(unname(as.list(value)), function(v) ketch_normalize(elem, v)))
    v <- unlist(value, use.names = FALSE)
    if (elem == "str") return(if (is.null(v)) character(0) else enc2utf8(as.character(v)))
    return(if (is.null(v)) numeric(0) else as.numeric(v))
  }
  as.numeric(one(unlist(value)))
}

# ---------------------------------------------------------------- encoding

ketch_table_writer <- function(table, body) {
  force(table); force(body)
  function(b) ketch_write_table(b, table, body)
}

ketch_write_table <- function(b, table, body) {
  spec <- KETCH_SPEC[[table]]
  fields <- list()
  for (i in seq_along(spec)) {
    name <- names(spec)[i]
    kind <- spec[[i]]
    value <- body[[name]]
    id <- i - 1L
    if (is.null(value)) next
    if (kind == "str") {
      if (nzchar(value)) fields[[length(fields) + 1]] <- list(id = id, kind = "offset",
        value = local({ s <- value; function(b) fb_write_string(b, s) }))
    } else if (startsWith(kind, "[")) {
      if (length(value) == 0) next
      elem <- substr(kind, 2, nchar(kind) - 1)
      writer <- local({
        v <- value; e <- elem
        if (e == "str") function(b) fb_write_strings(b, v)
        else if (e %in% names(KETCH_SPEC)) function(b) fb_write_offsets(b, v, function(b, item) ketch_write_table(b, e, item))
        else function(b) fb_write_scalars(b, v, e)
      })
      fields[[length(fields) + 1]] <- list(id = id, kind = "offset", value = writer)
    } else if (kind %in% names(KETCH_SPEC)) {
      fields[[length(fields) + 1]] <- list(id = id, kind = "offset", value = ketch_table_writer(kind, value))
    } else {
      default <- ketch_field_default(table, name, kind)
      if (kind %in% names(KETCH_ENUMS)) {
        value <- ketch_enum_code(kind, value)
        default <- ketch_enum_code(kind, default)
        kind <- KETCH_ENUMS[[kind]]$kind
      }
      if (identical(as.numeric(value), as.numeric(default))) next
      fields[[length(fields) + 1]] <- list(id = id, kind = kind, value = value)
    }
  }
  fb_write_table(b, fields)
}

#' Encode and decode Ketch header frames
#'
#' A header frame is one FlatBuffer with root \code{Envelope} and file identifier
#' \code{"KTCH"}. A decoded message is \code{list(type, version, body)} with every field
#' of the body present: strings as character, numbers as doubles (64-bit integers are
#' exact below 2^53), enums by name, absent sub-tables \code{NULL}, absent vectors empty.
#' \code{KETCH_PROTOCOL_VERSIONS} are the protocol versions this package speaks (2 adds
#' \code{Hello.versions}, \code{Welcome.version} and \code{Paused});
#' \code{KETCH_PROTOCOL_VERSION} is the first, what a peer that names none speaks.
#'
#' @param type body name (\code{"Hello"}, \code{"PredictReply"}, ...) or a whole message
#'   \code{list(type, version, body)}.
#' @param body named list of fields; missing fields take the schema default.
#' @param version protocol version to write; by default the version that brought the body
#'   (1 for every message but \code{Paused}, 2).
#' @param frame raw vector, frame 0 of a message.
#' @param msg a message as returned by \code{ketch_decode}.
#' @param x a message, or JSON text / parsed JSON of the form
#'   \code{{"type", "version", "body"}} (a \code{"payloads"} member is ignored).
#' @return \code{ketch_encode}: a raw vector. \code{ketch_decode},
#'   \code{ketch_from_canonical}: a message. \code{ketch_canonical_json}: JSON text laid
#'   out like the golden twins (every field, enums by name, two-space indent).
#'   \code{ketch_decode} signals \code{"ketch_decode_error"} for a frame that is not a
#'   Ketch envelope (with the extra class \code{"ketch_unknown_message"} for an unknown
#'   body type).
#' @examples
#' h <- ketch_encode("Ready", list(credits = 4))
#' ketch_decode(h)$body$credits
#' cat(ketch_canonical_json(ketch_decode(h)))
#' @name ketch_codec
NULL

#' @rdname ketch_codec
#' @export
ketch_encode <- function(type, body = list(), version = NULL) {
  if (is.list(type)) {
    msg <- type
    return(ketch_encode(msg$type, msg$body, msg$version))
  }
  code <- KETCH_BODIES[type]
  if (is.na(code)) stop("unknown message type ", type)
  if (is.null(version)) version <- KETCH_BODY_SINCE[[type]]
  body <- ketch_normalize(type, body)
  env <- KETCH_FIELD_IDS$Envelope
  fb_finish(function(b) {
    fb_write_table(b, list(
      list(id = env[["version"]], kind = "u16", value = version),
      list(id = env[["body_type"]], kind = "u8", value = unname(code)),
      list(id = env[["body"]], kind = "offset", value = ketch_table_writer(type, body))
    ))
  }, identifier = KETCH_IDENTIFIER)
}

# ---------------------------------------------------------------- decoding

ketch_read_table <- function(tab, table) {
  spec <- KETCH_SPEC[[table]]
  out <- vector("list", length(spec))
  names(out) <- names(spec)
  for (i in seq_along(spec)) {
    name <- names(spec)[i]
    kind <- spec[[i]]
    id <- i - 1L
    value <- if (kind == "str") {
      fb_get_string(tab, id)
    } else if (startsWith(kind, "[")) {
      elem <- substr(kind, 2, nchar(kind) - 1)
      if (elem == "str") fb_get_strings(tab, id)
      else if (elem %in% names(KETCH_SPEC)) lapply(fb_get_tables(tab, id), ketch_read_table, table = elem)
      else fb_get_scalars(tab, id, elem)
    } else if (kind %in% names(KETCH_SPEC)) {
      sub <- fb_get_table(tab, id)
      if (is.null(sub)) NULL else ketch_read_table(sub, kind)
    } else if (kind %in% names(KETCH_ENUMS)) {
      enum <- KETCH_ENUMS[[kind]]
      ketch_enum_name(kind, fb_get_scalar(tab, id, enum$kind, 0))
    } else {
      fb_get_scalar(tab, id, kind, ketch_field_default(table, name, kind))
    }
    out[name] <- list(value)
  }
  out
}

#' @rdname ketch_codec
#' @export
ketch_decode <- function(frame) {
  tryCatch({
    ids <- KETCH_FIELD_IDS$Envelope
    env <- fb_root(frame, KETCH_IDENTIFIER)
    version <- fb_get_scalar(env, ids[["version"]], "u16", 0)
    code <- fb_get_scalar(env, ids[["body_type"]], "u8", 0)
    type <- names(KETCH_BODIES)[match(code, KETCH_BODIES)]
    if (is.na(type)) {
      fb_error(sprintf("unknown message type %d (protocol version %d)", code, version),
               class = "ketch_unknown_message")
    }
    body <- fb_get_table(env, ids[["body"]])
    if (is.null(body)) fb_error(sprintf("%s without a body", type))
    list(type = type, version = version, body = ketch_read_table(body, type))
  }, error = function(e) {
    if (inherits(e, "ketch_decode_error")) stop(e)
    fb_error("header does not decode: ", conditionMessage(e))
  })
}

# ---------------------------------------------------------------- canonical JSON

#' @rdname ketch_codec
#' @export
ketch_from_canonical <- function(x) {
  if (is.character(x)) x <- jsonlite::fromJSON(x, simplifyVector = FALSE)
  type <- x$type
  if (is.null(type) || is.na(KETCH_BODIES[type])) stop("unknown message type ", format(type))
  version <- if (is.null(x$version)) unname(KETCH_BODY_SINCE[[type]]) else as.numeric(x$version)
  list(type = type, version = version, body = ketch_normalize(type, x$body))
}

#' @rdname ketch_codec
#' @export
ketch_canonical_json <- function(msg) {
  msg <- ketch_from_canonical(msg)
  tree <- list(type = json_token(json_string(msg$type)),
               version = json_token(json_int(msg$version)),
               body = json_body_tree(msg$type, msg$body))
  json_render(tree, 0L)
}

json_body_tree <- function(table, body) {
  spec <- KETCH_SPEC[[table]]
  out <- vector("list", length(spec))
  names(out) <- names(spec)
  for (name in names(spec)) {
    kind <- spec[[name]]
    value <- body[[name]]
    out[[name]] <- if (startsWith(kind, "[")) {
      elem <- substr(kind, 2, nchar(kind) - 1)
      json_array(lapply(value, function(v) json_value_tree(elem, v)))
    } else {
      json_value_tree(kind, value)
    }
  }
  out
}

json_value_tree <- function(kind, value) {
  if (kind %in% names(KETCH_SPEC)) {
    return(if (is.null(value)) json_token("null") else json_body_tree(kind, value))
  }
  json_token(switch(kind,
    str = json_string(value),
    bool = if (isTRUE(value)) "true" else "false",
    f32 = , f64 = json_float(value),
    if (is.character(value)) json_string(value) else json_int(value)
  ))
}

json_token <- function(text) structure(text, class = "json_token")
json_array <- function(items) structure(items, class = "json_array")

json_int <- function(x) sprintf("%.0f", x)

# Shortest text that reads back as the same double, with a ".0" on whole numbers.
json_float <- function(x) {
  if (is.nan(x)) return("NaN")
  if (is.infinite(x)) return(if (x > 0) "Infinity" else "-Infinity")
  for (digits in 1:17) {
    s <- sprintf("%.*g", digits, x)
    if (as.numeric(s) == x) break
  }
  if (!grepl("[.e]", s)) s <- paste0(s, ".0")
  s
}

json_string <- function(s) {
  cps <- utf8ToInt(enc2utf8(s))
  if (length(cps) == 0) return('""')
  if (anyNA(cps)) stop("string is not valid UTF-8")
  chars <- intToUtf8(cps, multiple = TRUE)
  special <- c(`34` = '\\"', `92` = "\\\\", `8` = "\\b", `12` = "\\f", `10` = "\\n",
               `13` = "\\r", `9` = "\\t")
  hit <- as.character(cps) %in% names(special)
  chars[hit] <- special[as.character(cps[hit])]
  ctrl <- cps < 32 & !hit
  chars[ctrl] <- sprintf("\\u%04x", cps[ctrl])
  paste0('"', paste(chars, collapse = ""), '"')
}

json_render <- function(node, indent) {
  if (inherits(node, "json_token")) return(unclass(node))
  pad <- strrep(" ", indent + 2L)
  if (inherits(node, "json_array") || is.null(names(node))) {
    if (length(node) == 0) return("[]")
    items <- vapply(node, json_render, character(1), indent = indent + 2L)
    return(paste0("[\n", paste0(pad, items, collapse = ",\n"), "\n", strrep(" ", indent), "]"))
  }
  if (length(node) == 0) return("{}")
  items <- vapply(node, json_render, character(1), indent = indent + 2L)
  paste0("{\n", paste0(pad, json_string_vec(names(node)), ": ", items, collapse = ",\n"), "\n",
         strrep(" ", indent), "}")
}

json_string_vec <- function(x) vapply(x, json_string, character(1), USE.NAMES = FALSE)
