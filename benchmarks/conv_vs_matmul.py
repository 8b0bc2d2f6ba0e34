"""Per-call cost of a 1x1 convolution against the same product as a MatMul, in TensorFlow.

    python benchmarks/conv_vs_matmul.py              (TensorFlow's default threads: all cores)
    python benchmarks/conv_vs_matmul.py --threads=1  (one intra- and one inter-op thread)
    python benchmarks/conv_vs_matmul.py --sweep [--batch=32] [--threads=1]
                                                     (the sizes of ResNet50's and MobileNetV2's
                                                     1x1 convs at 128x128, dense and shrunk)

40 chained blocks inside one tf.function, each a 1x1 convolution (constant kernel) + BiasAdd +
ReLU6, against the same blocks as Reshape -> MatMul -> BiasAdd -> ReLU6 -> Reshape (to a static
shape, and to one computed from the input at run time): the median time of a call over 100,
divided by 40. The numbers behind finalize's pointwise_matmul option (benchmarks/README.md,
"TensorFlow's threads").

--sweep: for each (height, Cin, Cout), 10 pairs of blocks Cin -> Cout -> Cin (1x1 conv + BiasAdd +
ReLU6, or the MatMul form with a static shape), per block at --batch (1): the multiply-adds per
image at which the MatMul stops gaining is pointwise_matmul's AUTO_MAX_MACS (finalize's
pointwise_matmul="auto").
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
    for _ in range(10 if calls >= 50 else 5):
        function(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        function(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


# (height = width, Cin, Cout): MobileNetV2's 1x1 convs at 128x128 (dense and shrunk), then ResNet50's
SWEEP = [(64, 32, 16), (64, 16, 48), (32, 24, 72), (32, 72, 24), (16, 32, 96), (16, 96, 32), (8, 64, 192),
         (8, 192, 64), (8, 96, 288), (4, 160, 480), (4, 480, 160), (4, 320, 640), (4, 320, 1280),
         (32, 32, 128), (32, 64, 64), (16, 64, 256), (8, 128, 512), (4, 256, 1024), (16, 256, 128), (8, 512, 256),
         (4, 1024, 512), (32, 64, 256), (32, 256, 64), (16, 128, 512), (16, 512, 128), (8, 256, 1024),
         (8, 1024, 256), (4, 512, 2048), (4, 2048, 512)]


def sweep(batch: int, pairs: int = 10) -> None:
    rng = np.random.RandomState(0)
    print(f"batch {batch}; microseconds per block")
    print("| input -> output | multiply-adds per image | conv | MatMul | MatMul / conv |")
    print("|---|---|---|---|---|")
    for size, cin, cout in SWEEP:
        kernels = [rng.randn(1, 1, cin, cout).astype(np.float32) * 0.1,
                   rng.randn(1, 1, cout, cin).astype(np.float32) * 0.1]
        biases = [rng.randn(cout).astype(np.float32), rng.randn(cin).astype(np.float32)]

        def conv(x):
            for _ in range(pairs):
                for kernel, bias in zip(kernels, biases):
                    x = tf.nn.relu6(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias))
            return x

        def matmul(x):
            for _ in range(pairs):
                for kernel, bias in zip(kernels, biases):
                    rows, columns = kernel.shape[2:]
                    y = tf.matmul(tf.reshape(x, [-1, rows]), kernel.reshape(rows, columns))
                    x = tf.reshape(tf.nn.relu6(tf.nn.bias_add(y, bias)), [-1, size, size, columns])
            return x

        spec = tf.TensorSpec([None, size, size, cin])
        x = tf.constant(rng.rand(batch, size, size, cin).astype(np.float32))
        calls = 60 if batch == 1 else 15
        cells = [_median_us(tf.function(f, input_signature=[spec]), x, calls) / (2 * pairs) for f in (conv, matmul)]
        print(f"| {size}x{size}x{cin} -> {cout} | {size * size * cin * cout / 1e6:.2f}M | {cells[0]:.0f} | "
              f"{cells[1]:.0f} | {cells[1] / cells[0]:.2f} |", flush=True)


def main(argv) -> None:
    threads = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--threads=")), None)
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(int(threads))
    if "--sweep" in argv:
        print(f"threads: {threads or 'default'}")
        sweep(int(next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--batch=")), 1)))
        return
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
