# For R CMD check of the installed package; Rscript tests/run.R runs the same tests
# from the sources.
library(testthat)
library(ketch)
test_check("ketch")
