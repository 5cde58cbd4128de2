package io.ketch;

import java.lang.reflect.Constructor;
import java.lang.reflect.Method;
import java.lang.reflect.Proxy;

/**
 * SIGTERM and SIGINT handlers through {@code sun.misc.Signal} (module jdk.unsupported, present
 * in every OpenJDK build), reached by reflection so that a JVM without it only loses this
 * convenience. A handled signal does not start the JVM's shutdown: the container can drain
 * with logging and everything else still working.
 */
final class Signals {
    private Signals() {}

    /** Installs {@code action} for TERM and INT; false when this JVM cannot. */
    static boolean install(Runnable action) {
        try {
            Class<?> signal = Class.forName("sun.misc.Signal");
            Class<?> handler = Class.forName("sun.misc.SignalHandler");
            Constructor<?> make = signal.getConstructor(String.class);
            Method handle = signal.getMethod("handle", signal, handler);
            Object proxy = Proxy.newProxyInstance(Signals.class.getClassLoader(), new Class<?>[] {handler},
                    (self, method, args) -> {
                        if (method.getName().equals("handle")) {
                            action.run();
                            return null;
                        }
                        return switch (method.getName()) {
                            case "hashCode" -> System.identityHashCode(self);
                            case "equals" -> self == args[0];
                            default -> "ketch signal handler";
                        };
                    });
            for (String name : new String[] {"TERM", "INT"}) {
                handle.invoke(null, make.newInstance(name), proxy);
            }
            return true;
        } catch (ReflectiveOperationException | RuntimeException | LinkageError e) {
            return false;
        }
    }
}
