from cifar_run.cli import main

main()
