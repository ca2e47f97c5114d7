// A Go module of two packages: the main package and greet, which it imports.
package main

import (
	"fmt"
	"os"

	"example.com/gomodule/greet"
)

func main() {
	fmt.Println(greet.Everyone(os.Args[1:]))
}
