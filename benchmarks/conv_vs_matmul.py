"""Per-call cost of a 1x1 convolution against the same product as a MatMul, in TensorFlow.

    python benchmarks/conv_vs_matmul.py              (TensorFlow's default threads: all cores)
    python benchmarks/conv_vs_matmul.py --threads=1  (one intra- and one inter-op thread)

40 chained blocks inside one tf.function, each a 1x1 convolution (constant kernel) + BiasAdd +
ReLU6, against the same blocks as Reshape -> MatMul -> BiasAdd -> ReLU6 -> Reshape (to a static
shape, and to one computed from the input at run time): the median time of a call over 100,
divided by 40. The numbers behind finalize's pointwise_matmul option (benchmarks/README.md,
"TensorFlow's threads").
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

BLOCKS = 40
SHAPES = [(32, 16), (16, 96), (8, 64), (4, 480)]  # (height = width, channels in = out)


def _median_us(function, x, calls=100) -> float:
    for _ in range(10):
        function(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        function(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def main(argv) -> None:
    threads = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--threads=")), None)
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(int(threads))
    rng = np.random.RandomState(0)
    print(f"threads: {threads or 'default'}; microseconds per block")
    print("| input | conv | MatMul, static shape | MatMul, shape at run time |")
    print("|---|---|---|---|")
    for size, channels in SHAPES:
        kernels = [rng.randn(1, 1, channels, channels).astype(np.float32) * 0.1 for _ in range(BLOCKS)]
        bias = rng.randn(channels).astype(np.float32)

        def conv(x):
            for kernel in kernels:
                x = tf.nn.relu6(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias))
            return x

        def matmul_static(x):
            for kernel in kernels:
                y = tf.matmul(tf.reshape(x, [-1, channels]), kernel.reshape(channels, channels))
                x = tf.reshape(tf.nn.relu6(tf.nn.bias_add(y, bias)), [-1, size, size, channels])
            return x

        def matmul_dynamic(x):
            for kernel in kernels:
                shape = tf.concat([tf.shape(x)[:-1], [channels]], 0)
                y = tf.matmul(tf.reshape(x, [-1, channels]), kernel.reshape(channels, channels))
                x = tf.reshape(tf.nn.relu6(tf.nn.bias_add(y, bias)), shape)
            return x

        spec = tf.TensorSpec([None, size, size, channels])
        x = tf.constant(rng.rand(1, size, size, channels).astype(np.float32))
        cells = [_median_us(tf.function(f, input_signature=[spec]), x) / BLOCKS
                 for f in (conv, matmul_static, matmul_dynamic)]
        print(f"| {size}x{size}x{channels} -> {channels} | " + " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
