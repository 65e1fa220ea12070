package testenv

import "syscall"

// CPUNanos is the user+system CPU time the process has used, in nanoseconds. Benchmarks
// report it per operation (cpu-ns/op) beside Go's wall-clock ns/op: on a shared machine the
// wall clock measures the neighbours as much as the code.
func CPUNanos() int64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru.Utime.Nano() + ru.Stime.Nano()
}
