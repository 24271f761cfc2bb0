from diffgraph.benchmarks.merge.run import main

main()
