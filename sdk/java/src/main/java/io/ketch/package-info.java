/**
 * Ketch Java SDK: serve a model to a Ketch broker from the JVM.
 *
 * <ul>
 *   <li>{@link io.ketch.Model}: the function you write, one output per input;
 *   <li>{@link io.ketch.Value}: an immutable typed input or output (dtype, shape, little-endian bytes);
 *   <li>{@link io.ketch.Container}: connects to the broker's backend, says Hello, runs batches on a
 *       model thread while its I/O loop keeps heartbeating, reconnects, drains and says Goodbye;
 *   <li>{@link io.ketch.Codec}: the wire codec (flatbuffers {@code Envelope}, file identifier
 *       "KTCH", protocol version 1) over the generated {@code ketch.wire} classes, and the canonical
 *       JSON form of every message used by the golden vectors.
 * </ul>
 *
 * The protocol is docs/protocol.md; the bytes are defined by schemas/ketch.fbs.
 */
package io.ketch;
