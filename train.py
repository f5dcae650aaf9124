import sys

from ltnet_tf.commands.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv))
