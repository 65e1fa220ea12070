//go:build race

package pluginproto

import "syscall"

// raceReleaseIO tells the race detector that what this goroutine did before writing to fd
// happens before what a reader of the peer does after reading it, as the syscall package
// says for its own reads and writes: the data channel's writes are sendmsg calls it does not
// annotate. A write of nothing, in race builds only.
func raceReleaseIO(fd int) { _, _ = syscall.Write(fd, nil) }
