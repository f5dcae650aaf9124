import sys

from ltnet_tf.commands.cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main(sys.argv))
