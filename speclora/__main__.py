from speclora.cli import main

main()
