from fedwb.cli import main

main()
