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
 * Version shim, not part of the Ketch API.
 *
 * <p>The generated {@code ketch.wire} classes come from flatc 25.12.19 and reference
 * {@code Constants.FLATBUFFERS_25_12_19()}, but the newest flatbuffers-java on Maven Central
 * is 25.2.10 (google/flatbuffers#8730: later Java releases were not published). This class is
 * the 25.2.10 runtime's {@code Constants} with the 25.12.19 marker added; the Java runtime
 * API that the generated code uses did not change between the two. It shadows the runtime's
 * copy (project classes come first on the class path; the shaded jar excludes the other).
 * Delete this file once flatbuffers-java 25.12.19 is served and the pom points at it.
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
