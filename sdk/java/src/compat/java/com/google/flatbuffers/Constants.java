/*
 * Copyright 2014 Google Inc. All rights reserved.
 *
 * Licensed under the Apache License, Version 2.0 (the "License");
 * you may not use this file except in compliance with the License.
 * You may obtain a copy of the License at
 *
 *     http://www.apache.org/licenses/LICENSE-2.0
 *
 * Unless required by applicable law or agreed to in writing, software
 * distributed under the License is distributed on an "AS IS" BASIS,
 * WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
 * See the License for the specific language governing permissions and
 * limitations under the License.
 */

package com.google.flatbuffers;

/**
 * Compile-time stand-in, not part of the Ketch API and not in the thin jar.
 *
 * <p>Why it exists: the generated {@code ketch.wire} classes come from the pinned flatc
 * 25.12.19 (the Python runtime's version), and flatc writes into each class a
 * {@code ValidateVersion()} that calls {@code Constants.FLATBUFFERS_25_12_19()}; but the
 * newest flatbuffers-java on Maven Central is 25.2.10 (google/flatbuffers#8730: later Java
 * releases were not published), whose {@code Constants} has only the 25.2.10 marker. Nothing
 * else the generated code uses differs between the two runtimes (the golden vectors decode
 * and encode byte for byte with 25.2.10).
 *
 * <p>How it is used (pom.xml): this folder is a source root, so the generated code compiles
 * and the tests run with this class; the thin jar leaves {@code com/google/flatbuffers/**} out
 * (a user's project gets the real flatbuffers-java from Maven, and Ketch never calls
 * {@code ValidateVersion()}, the only reference to the missing marker: the JVM resolves a
 * method reference only when it runs); the shaded jar relocates this class with the runtime
 * to {@code io.ketch.shaded.flatbuffers}, in place of the runtime's own, so there even
 * {@code ValidateVersion()} works. Delete this folder once the generator targets the Java
 * runtime that is published, or flatbuffers-java 25.12.19 is.
 */
public class Constants {
    /** The number of bytes in a {@code byte}. */
    static final int SIZEOF_BYTE = 1;
    /** The number of bytes in a {@code short}. */
    static final int SIZEOF_SHORT = 2;
    /** The number of bytes in an {@code int}. */
    static final int SIZEOF_INT = 4;
    /** The number of bytes in a {@code float}. */
    static final int SIZEOF_FLOAT = 4;
    /** The number of bytes in a {@code long}. */
    static final int SIZEOF_LONG = 8;
    /** The number of bytes in a {@code double}. */
    static final int SIZEOF_DOUBLE = 8;
    /** The number of bytes in a file identifier. */
    static final int FILE_IDENTIFIER_LENGTH = 4;
    /** The number of bytes in a size prefix. */
    public static final int SIZE_PREFIX_LENGTH = 4;

    /** Version marker of the runtime on Maven Central. */
    public static void FLATBUFFERS_25_2_10() {}

    /** Version marker the flatc 25.12.19 generated code asks for. */
    public static void FLATBUFFERS_25_12_19() {}
}
