//go:build !race

package pluginproto

func raceReleaseIO(int) {}
